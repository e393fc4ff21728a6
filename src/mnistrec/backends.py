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
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from .errors import CheckpointError, MnistrecError, first_line

BACKENDS = ("torch", "onnx")


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


class OnnxBackend:
    """An onnxruntime CPU session over an ONNX model with one input ``[N, 1, 28, 28]``."""

    name = "onnx"

    def __init__(self, session, source: str) -> None:
        self.session = session
        inputs = session.get_inputs()
        if len(inputs) != 1 or list(inputs[0].shape[1:]) != [1, 28, 28]:
            shapes = ", ".join(f"{i.name}{i.shape}" for i in inputs)
            raise CheckpointError(f"{source}: ONNX model must take one input [N, 1, 28, 28], it takes {shapes}")
        self.input_name = inputs[0].name
        meta = session.get_modelmeta().custom_metadata_map
        self.metadata = dict(meta)
        self.model_name = meta.get("mnistrec.model", "onnx")

    @classmethod
    def from_bytes(cls, data: bytes | str, source: str = "<memory>", threads: int = 0) -> "OnnxBackend":
        """A session over serialised ONNX bytes (or a file path); unreadable models become one-line errors.

        ``threads``: onnxruntime's intra-op threads (0: its default, one per physical core).
        """
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only; onnxruntime's info lines are not for our users
        options.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own pybind11 classes (InvalidProtobuf, Fail, ...)
            raise CheckpointError(f"{source}: not a loadable ONNX model: {first_line(exc)}") from None
        return cls(session, source)

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to(torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


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
    from .checkpoint import load_checkpoint

    loaded = load_checkpoint(path)
    if backend == "torch":
        return TorchBackend(loaded.model, loaded.model_name)
    from .export import export_metadata, onnx_model_proto

    proto = onnx_model_proto(loaded.model, export_metadata(loaded.model_name, loaded.model_kwargs))
    return OnnxBackend.from_bytes(proto.SerializeToString(), str(path))
