"""Export to ONNX and TorchScript, the inference backends, and `--backend` through the CLI.

Parity is checked on the full 10,000-image test set for the trained MLP, and on real
test images for every registered model with untrained weights, so models added to
the registry later are covered automatically.
"""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from conftest import run_cli
from mnistrec.backends import OnnxBackend, TorchBackend, load_backend
from mnistrec.checkpoint import load_checkpoint, save_checkpoint
from mnistrec.cli import main
from mnistrec.data import to_float
from mnistrec.errors import CheckpointError, MnistrecError
from mnistrec.evaluate import predict_logits
from mnistrec.export import INPUT_NAME, OPSET, TOLERANCE, export_checkpoint
from mnistrec.models import create_model, model_names


@pytest.fixture(scope="module")
def exported(mlp_checkpoint, tmp_path_factory):
    """The MLP checkpoint exported through the CLI in both formats."""
    out = tmp_path_factory.mktemp("export")
    onnx_path, ts_path = out / "mlp.onnx", out / "mlp.pt"
    for fmt, path in (("onnx", onnx_path), ("torchscript", ts_path)):
        result = run_cli("export", mlp_checkpoint, "--format", fmt, "-o", path)
        assert result.returncode == 0, result.stderr
        assert str(path) in result.stdout
    return onnx_path, ts_path


def test_onnx_file_is_valid_with_dynamic_batch_opset_and_metadata(exported):
    model = onnx.load(exported[0])
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")] == [("", OPSET)]
    (graph_input,) = model.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert graph_input.name == INPUT_NAME
    assert dims[0].dim_param and not dims[0].dim_value  # symbolic batch axis
    assert [d.dim_value for d in dims[1:]] == [1, 28, 28]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["mnistrec.model"] == "mlp"
    assert "[0, 1]" in meta["mnistrec.input"] and "normalisation is inside" in meta["mnistrec.input"]


def test_exports_match_pytorch_on_the_full_test_set(exported, mlp_checkpoint, mnist):
    reference = predict_logits(load_checkpoint(mlp_checkpoint).model, mnist.test_images, 1000)
    onnx_logits = predict_logits(load_backend(exported[0], "onnx"), mnist.test_images, 1000)
    scripted = torch.jit.load(str(exported[1]))
    ts_logits = predict_logits(scripted, mnist.test_images, 1000)
    for logits in (onnx_logits, ts_logits):
        assert logits.shape == (10_000, 10)
        assert (logits - reference).abs().max() <= TOLERANCE
        assert torch.equal(logits.argmax(1), reference.argmax(1))  # 100% the same digits
    # The trained model is a real classifier, so agreement is not trivially "all zeros".
    assert (reference.argmax(1) == mnist.test_labels).float().mean() > 0.9


@pytest.mark.parametrize("name", model_names())
def test_every_registered_model_exports_with_parity(name, tmp_path, mnist):
    torch.manual_seed(0)
    model = create_model(name).eval()
    checkpoint = tmp_path / f"{name}.pth"
    save_checkpoint(checkpoint, name, {}, model)
    images = to_float(mnist.test_images[:1000])
    with torch.inference_mode():
        reference = model(images)
    onnx_backend = OnnxBackend.from_bytes(str(export_checkpoint(checkpoint, "onnx", tmp_path / "m.onnx")))
    scripted = torch.jit.load(str(export_checkpoint(checkpoint, "torchscript", tmp_path / "m.pt")))
    for run in (onnx_backend.predict_logits, scripted):
        for batch in (images, images[:1], images[:37]):  # the batch axis really is dynamic
            logits = run(batch)
            assert (logits - reference[: len(batch)]).abs().max() <= TOLERANCE
            assert torch.equal(logits.argmax(1), reference[: len(batch)].argmax(1))


def test_evaluate_gives_the_same_accuracy_with_each_backend(exported, mlp_checkpoint, data_dir):
    runs = {
        "torch .pth": ("evaluate", mlp_checkpoint, "--backend", "torch"),
        "onnx .onnx": ("evaluate", exported[0], "--backend", "onnx", "--batch-size", "333"),
    }
    reports = {}
    for label, args in runs.items():
        result = run_cli(*args, "--json", "--data-dir", data_dir)
        assert result.returncode == 0, (label, result.stderr)
        reports[label] = json.loads(result.stdout)
    assert {r["backend"] for r in reports.values()} == {"torch", "onnx"}
    assert {r["model"] for r in reports.values()} == {"mlp"}
    torch_report = reports["torch .pth"]
    assert torch_report["count"] == 10_000 and torch_report["accuracy"] > 0.9
    for label, report in reports.items():
        assert report["errors"] == torch_report["errors"], label
        assert report["confusion_matrix"] == torch_report["confusion_matrix"], label
        assert report["loss"] == pytest.approx(torch_report["loss"], abs=1e-5), label


def test_onnx_backend_exports_a_pth_in_memory(mlp_checkpoint, mnist):
    torch_backend = load_backend(mlp_checkpoint, "torch")
    onnx_backend = load_backend(mlp_checkpoint, "onnx")  # a .pth is exported in memory
    assert isinstance(torch_backend, TorchBackend) and isinstance(onnx_backend, OnnxBackend)
    images = to_float(mnist.test_images[:256])
    assert (torch_backend.predict_logits(images) - onnx_backend.predict_logits(images)).abs().max() <= TOLERANCE


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mnistrec: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_corrupt_checkpoint_export_is_a_one_line_error(capsys, tmp_path, mlp_checkpoint):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(mlp_checkpoint.read_bytes()[:5000])  # a truncated real checkpoint
    for fmt in ("onnx", "torchscript"):
        err = _one_line_error(capsys, ["export", str(corrupt), "--format", fmt, "-o", str(tmp_path / "out")])
        assert "corrupt.pth" in err and "truncated or corrupt" in err
    assert not (tmp_path / "out").exists()


def test_bad_inputs_are_one_line_errors(capsys, tmp_path, mlp_checkpoint, exported):
    assert "no such checkpoint" in _one_line_error(capsys, ["export", str(tmp_path / "missing.pth")])
    # The torch backend cannot run an .onnx file (the default, auto, runs it with onnxruntime).
    assert "ONNX model; run it with --backend onnx" in _one_line_error(capsys, ["evaluate", str(exported[0]), "--backend", "torch"])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01 not a protobuf")
    assert "not a loadable ONNX model" in _one_line_error(capsys, ["evaluate", str(garbage), "--backend", "onnx"])
    overwrite = _one_line_error(capsys, ["export", str(mlp_checkpoint), "--format", "onnx", "-o", str(mlp_checkpoint)])
    assert "refusing to overwrite" in overwrite
    assert "--opset 7 is not supported" in _one_line_error(capsys, ["export", str(mlp_checkpoint), "--opset", "7"])
    with pytest.raises(MnistrecError, match="unknown backend"):
        load_backend(mlp_checkpoint, "tensorrt")
    # An ONNX model with the wrong input shape is refused when loaded, not on the first prediction.
    wrong = torch.nn.Linear(5, 10).eval()
    torch.onnx.export(wrong, (torch.rand(2, 5),), str(tmp_path / "wrong.onnx"), dynamo=True, verbose=False)
    with pytest.raises(CheckpointError, match=r"must take one input \[N, 1, 28, 28\]"):
        load_backend(tmp_path / "wrong.onnx", "onnx")
