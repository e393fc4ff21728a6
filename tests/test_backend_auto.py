"""The ``auto`` inference backend: onnxruntime for CNNs when installed (export cached), PyTorch for the MLP."""

from __future__ import annotations

import pytest
import torch

from mnistrec import backends, export
from mnistrec.backends import OnnxBackend, TorchBackend, backend_for, load_backend, resolve_backend
from mnistrec.checkpoint import load_checkpoint, save_checkpoint
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
