"""Temperature scaling, ECE/NLL, and the temperature applied by every consumer of a checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import run_cli
from mnistrec.calibrate import held_out_split
from mnistrec.calibration import (
    TemperatureScaled,
    calibration_record,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability_bins,
)
from mnistrec.checkpoint import load_checkpoint, read_checkpoint, with_calibration
from mnistrec.errors import CheckpointError, MnistrecError
from mnistrec.predict import UNSURE_BELOW


def _sampled(temperature: float, n: int = 20000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels drawn from softmax(logits / temperature): the true temperature is known."""
    g = torch.Generator().manual_seed(seed)
    logits = 4 * torch.randn(n, 10, generator=g)
    labels = torch.multinomial((logits / temperature).softmax(1), 1, generator=g).squeeze(1)
    return logits, labels


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_the_true_temperature(true_t):
    logits, labels = _sampled(true_t)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_t, rel=0.05)
    # It is the NLL minimum: nearby temperatures are worse.
    assert nll(logits / fitted, labels) < min(nll(logits / (fitted * 1.1), labels), nll(logits / (fitted / 1.1), labels))


def test_ece_by_hand():
    # 10 predictions at confidence 0.9, 9 right: perfectly calibrated.
    probs = torch.full((10, 10), 0.1 / 9, dtype=torch.float64)
    probs[:, 0] = 0.9
    labels = torch.tensor([0] * 9 + [1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)
    # Same confidence, half right: |0.5 - 0.9| = 0.4.
    assert expected_calibration_error(probs, torch.tensor([0] * 5 + [1] * 5)) == pytest.approx(0.4)
    # Two bins: 4 at 0.6 all right (gap 0.4), 6 at 0.9 with 3 right (gap 0.4): 0.4 overall.
    probs2 = probs.clone()
    probs2[:4, 0], probs2[:4, 1] = 0.6, 0.4 - 8 * (0.1 / 9)
    labels2 = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1, 1, 1])
    rows = [r for r in reliability_bins(probs2, labels2) if r["count"]]
    assert [r["count"] for r in rows] == [4, 6]
    assert expected_calibration_error(probs2, labels2) == pytest.approx(0.4 * 4 / 10 + 0.4 * 6 / 10)
    assert sum(r["count"] for r in reliability_bins(probs2, labels2)) == 10


def test_calibration_record_improves_validation_nll():
    logits, labels = _sampled(0.4)  # an under-confident model, as label smoothing makes them
    record = calibration_record(logits, labels, "synthetic")
    assert record["temperature"] == pytest.approx(0.4, rel=0.05)
    assert record["val_after"]["nll"] < record["val_before"]["nll"]
    assert record["val_after"]["ece"] < 0.02 < record["val_before"]["ece"]


def test_held_out_split_refuses_seen_images_unless_asked():
    own = {"config": {"val_size": 5000, "split_seed": 0}}
    assert held_out_split(own, None, None, False) == (5000, 0, False)
    assert held_out_split(own, 2000, None, False) == (2000, 0, False)  # a part of the held-out images: unseen
    with pytest.raises(MnistrecError, match="trained on some of these"):
        held_out_split(own, 5000, 1, False)  # another split seed: images it trained on
    assert held_out_split(own, 5000, 1, True) == (5000, 1, True)
    with pytest.raises(MnistrecError, match="--from"):
        held_out_split({"config": {"val_size": 0}}, None, None, False)


def test_calibrated_checkpoint_is_applied_by_predict_evaluate_and_export(mlp_checkpoint, tmp_path, data_dir, mnist):
    # The fixture trained on all of its images: calibrate refuses, with one line and exit 2.
    refused = run_cli("calibrate", mlp_checkpoint, "--data-dir", data_dir)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "--from" in refused.stderr
    calibrated = tmp_path / "calibrated.pth"
    done = run_cli("calibrate", mlp_checkpoint, "--val-size", "2000", "--allow-seen", "-o", calibrated,
                   "--data-dir", data_dir)
    assert done.returncode == 0, done.stderr
    record = read_checkpoint(calibrated)["calibration"]
    assert "SEEN" in record["fitted_on"] and record["count"] == 2000
    temperature = record["temperature"]
    assert 0.2 < temperature < 5 and temperature != 1.0
    assert "temperature" in done.stdout

    loaded = load_checkpoint(calibrated)
    assert loaded.temperature == temperature and isinstance(loaded.inference_model, TemperatureScaled)
    images, labels = mnist.test_images[:500], mnist.test_labels[:500]
    from mnistrec.evaluate import predict_logits

    raw = predict_logits(loaded.model, images)
    expected = raw / temperature

    # evaluate --json: calibrated NLL and ECE of logits / T.
    result = run_cli("evaluate", calibrated, "--json", "--limit-test", "500", "--data-dir", data_dir)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["nll"] == pytest.approx(nll(expected, labels), rel=1e-4)
    assert metrics["ece"] == pytest.approx(expected_calibration_error(expected.softmax(1), labels), abs=1e-4)
    assert metrics["nll"] != pytest.approx(nll(raw, labels), rel=1e-3)

    # ONNX export: 1/T is folded into the graph, and the metadata says which T.
    onnx_path = tmp_path / "calibrated.onnx"
    exported = run_cli("export", "-c", calibrated, "-o", onnx_path)
    assert exported.returncode == 0, exported.stderr
    from mnistrec.backends import load_backend

    backend = load_backend(onnx_path, "onnx")
    assert float(backend.metadata["mnistrec.temperature"]) == pytest.approx(temperature)
    from mnistrec.data import to_float

    torch.testing.assert_close(backend.predict_logits(to_float(images[:16])), expected[:16], atol=1e-4, rtol=1e-4)


def test_predict_probabilities_are_calibrated(mlp_checkpoint, tmp_path, mnist):
    from mnistrec.data import to_float
    from mnistrec.predict import predict_tensors

    record = {"method": "temperature scaling", "temperature": 2.0, "fitted_on": "test fixture", "count": 0}
    path = tmp_path / "t2.pth"
    with_calibration(mlp_checkpoint, record, path)
    loaded = load_checkpoint(path)
    x = to_float(mnist.test_images[:8])
    got = predict_tensors(loaded.inference_model, x, top_k=2)
    with torch.no_grad():
        want = (loaded.model(x) / 2.0).softmax(1)
    for row, probs in zip(got, want):
        assert row["probabilities"] == pytest.approx(probs.tolist(), abs=1e-6)
        assert row["unsure"] == (row["confidence"] < UNSURE_BELOW)


@pytest.mark.parametrize("bad", [float("nan"), -1.0, 0.0, 1e9, "hot"])
def test_invalid_temperature_is_one_line_checkpoint_error(mlp_checkpoint, tmp_path, bad):
    path = tmp_path / "bad.pth"
    obj = read_checkpoint(mlp_checkpoint)
    obj["calibration"] = {"temperature": bad}
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="temperature") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)
    assert not (isinstance(bad, float) and math.isfinite(bad) and 0.02 <= bad <= 50)


def test_training_fits_the_temperature_on_its_validation_split_and_final_runs_inherit_it(mnist, tmp_path):
    from mnistrec.training import make_config, train_final

    config = make_config("seed", epochs=1, limit_train=4000, val_size=1000, limit_test=500)
    result = train_final(config, mnist, tmp_path / "run", progress=False, log=lambda _: None)
    selection = read_checkpoint(tmp_path / "run" / "selection" / "model.pth")["calibration"]
    assert selection["count"] == 1000 and "validation split" in selection["fitted_on"]
    assert selection["val_after"]["nll"] <= selection["val_before"]["nll"]
    final = read_checkpoint(tmp_path / "run" / "model.pth")
    assert final["calibration"]["temperature"] == selection["temperature"]
    assert "selection run" in final["calibration"]["copied_from"]
    # The recorded test metrics are the calibrated model's.
    loaded = load_checkpoint(tmp_path / "run" / "model.pth")
    from mnistrec.evaluate import evaluate

    again = evaluate(loaded.inference_model, mnist.test_images[:500], mnist.test_labels[:500])
    assert final["metrics"]["nll"] == pytest.approx(again["nll"], rel=1e-4) == result.metrics["nll"]


def test_cli_table_and_json_say_not_sure_below_the_threshold(mlp_checkpoint, tmp_path, mnist):
    from PIL import Image

    # A very high temperature flattens every probability below the threshold: every prediction is unsure.
    flat = tmp_path / "flat.pth"
    with_calibration(mlp_checkpoint, {"method": "temperature scaling", "temperature": 40.0, "fitted_on": "test"}, flat)
    image = tmp_path / "digit.png"
    Image.fromarray(mnist.test_images[0].numpy()).save(image)
    table = run_cli("predict", "-c", flat, image)
    as_json = run_cli("predict", "-c", flat, image, "--json")
    assert table.returncode == as_json.returncode == 0, table.stderr + as_json.stderr
    assert "(not sure)" in table.stdout.splitlines()[1]
    result = json.loads(as_json.stdout)
    assert result["unsure"] is True and result["confidence"] < UNSURE_BELOW
