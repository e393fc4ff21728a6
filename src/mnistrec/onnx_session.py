"""An onnxruntime CPU session over an mnistrec ONNX model (a leaf: imports nothing else of mnistrec but errors).

Both :mod:`mnistrec.backends` (the ``onnx`` inference backend) and
:mod:`mnistrec.export` (which runs every export before writing it) use
:class:`OnnxBackend`, so it lives here and neither module imports the other
for it.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import CheckpointError, first_line


class OnnxBackend:
    """An onnxruntime CPU session over an ONNX model with one input ``[N, 1, 28, 28]``."""

    name = "onnx"

    def __init__(self, session: Any, source: str) -> None:
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
        # onnxruntime's pool threads busy-wait after each run by default: with small batches (a server, one image
        # at a time) that burned a core the image decodes needed. Idle threads sleep instead.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own pybind11 classes (InvalidProtobuf, Fail, ...)
            raise CheckpointError(f"{source}: not a loadable ONNX model: {first_line(exc)}") from None
        return cls(session, source)

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, 10]`` for float pixels ``x`` ``[N, 1, 28, 28]`` in [0, 1]."""
        array = x.detach().to(torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])
