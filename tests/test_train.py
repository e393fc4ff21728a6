"""Training: the seed recipe is the seed's, runs are reproducible, and a tiny run learns."""

from __future__ import annotations

import pytest
import torch

from mnistrec.errors import MnistrecError
from mnistrec.models import SeedMLP
from mnistrec.train import make_config, train


def _run(mnist, seed: int, lines: list[str] | None = None):
    config = make_config("seed", epochs=1, limit_train=2000, limit_test=500, seed=seed)
    return train(config, mnist, None, progress=False, log=(lines.append if lines is not None else lambda _: None))


def test_seed_recipe_is_the_seed_notebook():
    c = make_config("seed")
    assert (c.model, c.epochs, c.batch_size, c.optimizer, c.lr) == ("mlp", 5, 64, "adam", 1e-3)
    assert (c.weight_decay, c.schedule, c.label_smoothing, c.ema_decay, c.augment, c.val_size) == (0.0, "none", 0.0, 0.0, "none", 0)
    model = SeedMLP()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {"layer_1.weight": (512, 784), "layer_1.bias": (512,), "layer_2.weight": (256, 512),
                      "layer_2.bias": (256,), "layer_3.weight": (10, 256), "layer_3.bias": (10,)}
    # Normalisation inside the model: a pixel at the MNIST mean maps to 0.
    assert float(model.normalize(torch.full((1,), 0.1307))) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(MnistrecError, match="unknown recipe"):
        make_config("nope")


def test_same_seed_same_weights_and_metrics_different_seed_differs(mnist):
    lines: list[str] = []
    first, second, other = _run(mnist, 7, lines), _run(mnist, 7), _run(mnist, 8)
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), key
    strip = lambda history: [{k: v for k, v in row.items() if k != "seconds"} for row in history]  # noqa: E731
    assert strip(first.history) == strip(second.history)
    assert first.metrics == second.metrics

    assert not torch.equal(first.model.layer_1.weight, other.model.layer_1.weight)
    assert strip(first.history) != strip(other.history)

    # A tiny run (2,000 images, one epoch) learns far above chance (10%).
    assert first.metrics["accuracy"] > 0.7 and other.metrics["accuracy"] > 0.7
    assert lines and lines[0].startswith("Epoch 1/1, Train Loss: ")


def test_weight_ema_warms_up_then_uses_the_full_decay():
    """The EMA follows the model closely at first (no lingering random init), then averages with ``decay``."""
    from mnistrec.train import ema_update

    update = ema_update(0.999)
    ema, model = [torch.zeros(3)], [torch.ones(3)]
    update(ema, model, torch.tensor(1))  # n = 1: decay (1 + 1) / (10 + 1) = 2/11
    torch.testing.assert_close(ema[0], torch.full((3,), 9 / 11))
    ema = [torch.zeros(3)]
    update(ema, model, torch.tensor(100_000))  # long run: the full decay
    torch.testing.assert_close(ema[0], torch.full((3,), 1 - 0.999))
    counts = [torch.tensor(5)]
    update(counts, [torch.tensor(9)], torch.tensor(3))  # integer buffers take the model's value
    assert int(counts[0]) == 9


def test_ema_run_tracks_the_model_in_its_first_epoch(mnist):
    """With decay 0.999 and one short epoch, a plain EMA would still be mostly the random initialisation
    (near-chance validation accuracy); the warmed-up EMA scores close to the model itself."""
    config = make_config("best", model="cnn-small", epochs=1, limit_train=3000, val_size=1000, ema_decay=0.999,
                         augment="none", batch_size=64, threads=1)
    result = train(config, mnist, progress=False, log=lambda _: None, evaluate_test=False)
    assert result.history[0]["val_accuracy"] > 0.85


def test_bf16_precision_trains_under_autocast_and_evaluates_in_float32(mnist, monkeypatch):
    """``precision="bf16"``: the forward pass runs in bfloat16 (different weights from float32, same seed),
    it is reproducible, it learns, and the weights and evaluation stay float32."""
    seen: list[torch.dtype] = []
    original = torch.nn.Linear.forward

    def record(self, x):
        out = original(self, x)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Linear, "forward", record)

    def run(precision: str):
        config = make_config("seed", epochs=1, limit_train=2000, limit_test=500, seed=3, precision=precision)
        seen.clear()
        result = train(config, mnist, None, progress=False, log=lambda _: None)
        return result, list(seen)

    bf16, bf16_dtypes = run("bf16")
    again, _ = run("bf16")
    fp32, fp32_dtypes = run("fp32")
    assert torch.bfloat16 in bf16_dtypes and torch.bfloat16 not in fp32_dtypes
    assert bf16_dtypes[-1] == torch.float32  # the last forward is the test pass: float32
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(bf16.model.state_dict().values(), again.model.state_dict().values()))
    assert not torch.equal(bf16.model.layer_1.weight, fp32.model.layer_1.weight)
    assert (bf16.autocast, fp32.autocast) == ("bfloat16", None)
    assert bf16.metrics["accuracy"] > 0.7 and abs(bf16.metrics["accuracy"] - fp32.metrics["accuracy"]) < 0.05
    with pytest.raises(MnistrecError, match="unknown precision 'fp16'; choose from: fp32, bf16, auto"):
        make_config("seed", precision="fp16")


@pytest.mark.parametrize("bf16, amx, expected", [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                                  (False, False, None)])
def test_auto_precision_is_bf16_only_on_a_cpu_that_computes_it_natively(monkeypatch, bf16, amx, expected):
    from mnistrec.devices import autocast_dtype

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is expected
    assert autocast_dtype("bf16", cpu) is torch.bfloat16 and autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("fp32", torch.device("cuda")) is torch.float16  # CUDA: float16 with a gradient scaler
    assert [make_config(r).precision for r in ("seed", "fast", "best", "ensemble")] == ["fp32", "auto", "auto", "auto"]


def test_auto_precision_says_it_trains_in_bf16_and_records_it(mnist, monkeypatch, tmp_path):
    import json

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    lines: list[str] = []
    config = make_config("seed", epochs=1, limit_train=500, limit_test=100, precision="auto")
    result = train(config, mnist, tmp_path / "run", progress=False, log=lines.append)
    assert lines[0] == "precision auto: training steps in bfloat16 (this CPU computes it natively)"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["autocast"] == "bfloat16" == result.autocast


def test_a_training_state_saved_before_an_option_existed_still_resumes(mnist, tmp_path):
    """A ``last.pth`` written before ``precision`` existed has no such key: it trained in float32, so it resumes."""
    config = make_config("seed", epochs=1, limit_train=500, limit_test=100)
    first = train(config, mnist, tmp_path, progress=False, log=lambda _: None)
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    del state["config"]["precision"]
    torch.save(state, tmp_path / "last.pth")
    lines: list[str] = []
    again = train(config, mnist, tmp_path, resume=True, progress=False, log=lines.append)
    assert lines[0].startswith(f"resuming {tmp_path} after epoch 1/1")
    assert torch.equal(again.model.layer_1.weight, first.model.layer_1.weight)
    with pytest.raises(MnistrecError, match="precision='fp32' \\(now 'bf16'\\)"):
        train(make_config("seed", epochs=1, limit_train=500, limit_test=100, precision="bf16"), mnist, tmp_path,
              resume=True, progress=False, log=lambda _: None)


def test_cli_training_clock_starts_after_the_optimiser_machinery_is_imported(data_dir, tmp_path):
    """torch imports torch._dynamo when a process builds its first optimiser (~1 s): start-up, not training.
    `mnistrec train` imports it before `train()` starts its clock, in a fresh process where nothing had."""
    import json
    import subprocess
    import sys

    from conftest import cli_env

    script = """
import json, sys
import mnistrec.training as training
from mnistrec.cli import main
before = "torch._dynamo" in sys.modules
seen = {}
real_train = training.train
def spy(*args, **kwargs):
    seen["at_train"] = "torch._dynamo" in sys.modules
    return real_train(*args, **kwargs)
training.train = spy
code = main(sys.argv[1:])
print(json.dumps({"before": before, **seen, "code": code}))
"""
    done = subprocess.run([sys.executable, "-c", script, "train", "--data-dir", str(data_dir), "--epochs", "1",
                           "--limit-train", "300", "--limit-test", "100", "--out", str(tmp_path / "run"), "--save", "",
                           "--no-plots", "--quiet"], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"before": False, "at_train": True, "code": 0}


def test_a_recipe_run_saved_before_precision_existed_resumes_in_float32(mnist, tmp_path):
    """`mnistrec train --resume` reads the options from `last.pth`: one written before `precision` existed trained
    in float32, so it resumes in float32 even though its recipe (`best`) now says "auto"."""
    from mnistrec.training import resume_config

    tiny = dict(model="mlp", augment="none", epochs=2, limit_train=500, limit_test=100, precision="fp32")
    first = train(make_config("best", **tiny), mnist, tmp_path, progress=False, log=lambda _: None)
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    del state["config"]["precision"]
    torch.save(state, tmp_path / "last.pth")
    config = resume_config(tmp_path)
    assert config.recipe == "best" and config.precision == "fp32" and make_config("best").precision == "auto"
    lines: list[str] = []
    resumed = train(config, mnist, tmp_path, resume=True, progress=False, log=lines.append)
    assert lines[0].startswith(f"resuming {tmp_path} after epoch 2/2") and resumed.autocast is None
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(), first.model.state_dict().values()))
