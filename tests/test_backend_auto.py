"""The ``auto`` inference backend: onnxruntime for CNNs when installed (export cached), PyTorch for the MLP."""

from __future__ import annotations

import pytest
import torch

from mnistrec import backends, export
from mnistrec.backends import OnnxBackend, TorchBackend, backend_for, load_backend, resolve_backend
from mnistrec.checkpoint import load_checkpoint, save_checkpoint
from mnistrec.data import to_float
from mnistrec.errors import MnistrecError
from mnistrec.models import create_model


@pytest.fixture(scope="module")
def cnn_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cnn") / "cnn-lite.pth"
    save_checkpoint(path, "cnn-lite", {}, create_model("cnn-lite").eval())
    return path


def test_resolution_rules(monkeypatch):
    assert resolve_backend("torch", "cnn-lite") == "torch" and resolve_backend("onnx", "mlp") == "onnx"
    assert resolve_backend("auto", path="model.onnx") == "onnx"
    assert resolve_backend("auto", "mlp") == "torch"
    assert resolve_backend("auto", "cnn-lite") == "onnx"  # the dev environment has the export extra
    monkeypatch.setattr(backends, "onnx_available", lambda: False)
    assert resolve_backend("auto", "cnn-wide") == "torch"
    with pytest.raises(MnistrecError, match="unknown backend"):
        resolve_backend("tensorrt", "mlp")


def test_auto_runs_a_cnn_on_onnxruntime_and_caches_the_export(cnn_checkpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = load_backend(cnn_checkpoint)  # default: auto
    assert isinstance(first, OnnxBackend) and first.model_name == "cnn-lite"
    cached = list((tmp_path / "cache" / "mnistrec" / "onnx").glob("*.onnx"))
    assert len(cached) == 1
    # The second load reads the cache: exporting again would fail here.
    monkeypatch.setattr(export, "onnx_model_proto", lambda *a, **k: pytest.fail("exported again"))
    second = backend_for(load_checkpoint(cnn_checkpoint))
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    reference = TorchBackend(load_checkpoint(cnn_checkpoint).inference_model, "cnn-lite").predict_logits(x)
    for backend in (first, second):
        assert (backend.predict_logits(x) - reference).abs().max() < 1e-4


def test_auto_keeps_the_mlp_on_torch(mlp_checkpoint):
    assert isinstance(load_backend(mlp_checkpoint), TorchBackend)


def test_an_export_beside_its_checkpoint_is_used_and_a_stale_one_ignored(cnn_checkpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ckpt = tmp_path / "model.pth"
    ckpt.write_bytes(cnn_checkpoint.read_bytes())
    export.export_checkpoint(ckpt, "onnx")  # writes model.onnx beside it, recording the checkpoint's SHA-256
    assert (tmp_path / "model.onnx").is_file()
    real_export = export.onnx_model_proto
    monkeypatch.setattr(export, "onnx_model_proto", lambda *a, **k: pytest.fail("exported although model.onnx fits"))
    beside = load_backend(ckpt)
    assert isinstance(beside, OnnxBackend) and beside.session is not None
    assert not (tmp_path / "cache").exists()  # nothing exported, nothing cached
    # Retrain-in-place: new weights under the same name. The old model.onnx must not answer for them.
    torch.manual_seed(1)
    save_checkpoint(ckpt, "cnn-lite", {}, create_model("cnn-lite").eval())
    exported = []
    monkeypatch.setattr(export, "onnx_model_proto", lambda *a, **k: exported.append(1) or real_export(*a, **k))
    fresh = load_backend(ckpt)
    assert exported == [1]
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    reference = TorchBackend(load_checkpoint(ckpt).inference_model, "cnn-lite").predict_logits(x)
    assert (fresh.predict_logits(x) - reference).abs().max() < 1e-4
    assert (beside.predict_logits(x) - reference).abs().max() > 1e-3  # it really was the other model


def test_the_shipped_model_comes_with_its_onnx_export(monkeypatch, tmp_path, mnist):
    from mnistrec.checkpoint import default_checkpoint

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(export, "onnx_model_proto", lambda *a, **k: pytest.fail("the shipped model was exported again"))
    backend = load_backend(default_checkpoint())
    assert isinstance(backend, OnnxBackend) and backend.model_name == "cnn-wide"
    x = to_float(mnist.test_images[:500])
    reference = TorchBackend(load_checkpoint(default_checkpoint()).inference_model, "cnn-wide").predict_logits(x)
    assert (backend.predict_logits(x) - reference).abs().max() < 1e-4  # calibrated logits, same as PyTorch's
