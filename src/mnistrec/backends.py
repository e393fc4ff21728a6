"""Inference backends: one interface over PyTorch and onnxruntime.

``load_backend(path, backend)`` returns an object with
``predict_logits(x: float32 [N, 1, 28, 28] in [0, 1]) -> torch.Tensor [N, 10]``,
``name`` (``"torch"`` or ``"onnx"``) and ``model_name``. Batching for large inputs
is the caller's job (:func:`mnistrec.evaluate.predict_logits` does it for any backend).

Which files each backend takes (the rule is the file name: ``*.onnx`` is an ONNX
model, anything else a PyTorch checkpoint):

* ``torch``: a ``.pth`` checkpoint (ours or a seed-style bare ``state_dict``).
* ``onnx``: an exported ``.onnx`` file, or a ``.pth`` checkpoint, which is then
  exported in memory first (a few seconds with the ``torch.export`` exporter; export
  once with ``mnistrec export`` to start fast).

Both return calibrated logits: a checkpoint's temperature (:mod:`mnistrec.calibration`)
is applied by the torch backend and folded into the graph of an ONNX export.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from .checkpoint import LoadedModel, load_checkpoint
from .errors import CheckpointError, MnistrecError
from .onnx_session import OnnxBackend

BACKENDS = ("torch", "onnx")
__all__ = ["BACKENDS", "Backend", "OnnxBackend", "TorchBackend", "backend_for", "load_backend"]


class Backend(Protocol):
    name: str
    model_name: str

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor: ...


class TorchBackend:
    """A PyTorch model in eval mode, run under ``torch.inference_mode``."""

    name = "torch"

    def __init__(self, model: nn.Module, model_name: str) -> None:
        self.model = model.eval()
        self.model_name = model_name

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(x)


def load_backend(path: str | os.PathLike, backend: str = "torch") -> Backend:
    """Load ``path`` (a ``.pth`` checkpoint or an ``.onnx`` export) for inference with ``backend``."""
    path = Path(path)
    if backend not in BACKENDS:
        raise MnistrecError(f"unknown backend {backend!r}; choose from: {', '.join(BACKENDS)}")
    is_onnx = path.suffix.lower() == ".onnx"
    if is_onnx and backend == "torch":
        raise MnistrecError(f"{path} is an ONNX model; run it with --backend onnx (or pass the .pth checkpoint)")
    if is_onnx:
        if not path.is_file():
            raise CheckpointError(f"{path}: no such ONNX file")
        return OnnxBackend.from_bytes(str(path), str(path))
    return backend_for(load_checkpoint(path), backend)


def backend_for(loaded: LoadedModel, backend: str = "torch") -> Backend:
    """Run an already loaded checkpoint with ``backend`` (for ``onnx``, exported in memory first)."""
    if backend not in BACKENDS:
        raise MnistrecError(f"unknown backend {backend!r}; choose from: {', '.join(BACKENDS)}")
    if backend == "torch":
        return TorchBackend(loaded.inference_model, loaded.model_name)
    from .export import export_metadata, onnx_model_proto  # onnx and its exporter: only for this backend

    proto = onnx_model_proto(loaded.inference_model, export_metadata(loaded.model_name, loaded.model_kwargs,
                                                                     temperature=loaded.temperature))
    return OnnxBackend.from_bytes(proto.SerializeToString(), str(loaded.path or "<memory>"))
