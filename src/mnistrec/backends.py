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
  once with ``mnistrec export`` to start fast: an ``X.onnx`` written by it beside
  ``X.pth`` is used directly, see below).

``auto`` (the default of ``predict``, ``evaluate`` and ``serve``) picks by what was
measured (``benchmarks/bench_inference.py``): onnxruntime runs the CNNs several times
faster than eager PyTorch, while the MLP is as fast in PyTorch. So ``auto`` is
``onnx`` for an ``.onnx`` file, and for a checkpoint of any model but the MLP when
onnxruntime and the exporter are installed; ``torch`` otherwise. The in-memory
export takes seconds, so it is avoided where it can be: an ``X.onnx`` beside ``X.pth``
whose metadata names the SHA-256 of exactly that checkpoint's bytes (what
``mnistrec export`` records) is used as it is (the shipped default model comes with
one, so a new user's first ``predict`` pays no export); a stale one is ignored. Otherwise
the export is cached (``$XDG_CACHE_HOME/mnistrec/onnx/``, keyed by the checkpoint's
bytes, the torch version and the opset) and paid once per checkpoint.

Both return calibrated logits: a checkpoint's temperature (:mod:`mnistrec.calibration`)
is applied by the torch backend and folded into the graph of an ONNX export.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from .checkpoint import LoadedModel, load_checkpoint
from .errors import CheckpointError, MnistrecError
from .fileio import atomic_write, file_sha256
from .onnx_session import OnnxBackend

BACKENDS = ("auto", "torch", "onnx")
#: Models that eager PyTorch runs as fast as onnxruntime (benchmarks/results/inference.json): auto keeps them on torch.
TORCH_FAST = ("mlp",)
__all__ = ["BACKENDS", "Backend", "OnnxBackend", "TorchBackend", "backend_for", "load_backend", "resolve_backend"]


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


def onnx_available() -> bool:
    """Are onnxruntime and the ONNX exporter installed (the ``export`` extra)?"""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx", "onnxscript"))


def resolve_backend(backend: str, model_name: str | None = None, path: str | os.PathLike | None = None) -> str:
    """The engine ``backend`` stands for: ``auto`` becomes ``onnx`` or ``torch`` (see the module's docstring)."""
    if backend not in BACKENDS:
        raise MnistrecError(f"unknown backend {backend!r}; choose from: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if path is not None and Path(path).suffix.lower() == ".onnx":
        return "onnx"
    return "onnx" if model_name not in TORCH_FAST and onnx_available() else "torch"


def load_backend(path: str | os.PathLike, backend: str = "auto") -> Backend:
    """Load ``path`` (a ``.pth`` checkpoint or an ``.onnx`` export) for inference with ``backend``."""
    path = Path(path)
    is_onnx = path.suffix.lower() == ".onnx"
    if is_onnx:
        backend = resolve_backend(backend, path=path)
        if backend == "torch":
            raise MnistrecError(f"{path} is an ONNX model; run it with --backend onnx (or pass the .pth checkpoint)")
        if not path.is_file():
            raise CheckpointError(f"{path}: no such ONNX file")
        return OnnxBackend.from_bytes(str(path), str(path))
    if backend not in BACKENDS:
        raise MnistrecError(f"unknown backend {backend!r}; choose from: {', '.join(BACKENDS)}")
    return backend_for(load_checkpoint(path), backend)


def backend_for(loaded: LoadedModel, backend: str = "auto") -> Backend:
    """Run an already loaded checkpoint with ``backend``.

    For ``onnx``: the checkpoint's own ``.onnx`` beside it if it was exported from these bytes, else the
    cached export, else an export in memory (then cached).
    """
    backend = resolve_backend(backend, loaded.model_name)
    if backend == "torch":
        return TorchBackend(loaded.inference_model, loaded.model_name)
    digest = file_sha256(loaded.path) if loaded.path is not None and Path(loaded.path).is_file() else None
    sidecar = _sidecar_export(Path(loaded.path), digest) if digest else None
    if sidecar is not None:
        return sidecar
    cache = _export_cache_path(digest, loaded.temperature) if digest else None
    if cache is not None and cache.is_file():
        return OnnxBackend.from_bytes(str(cache), str(loaded.path or "<memory>"))
    from .export import export_metadata, onnx_model_proto  # onnx and its exporter: only for this backend

    proto = onnx_model_proto(loaded.inference_model, export_metadata(loaded.model_name, loaded.model_kwargs,
                                                                     temperature=loaded.temperature))
    data = proto.SerializeToString()
    if cache is not None:
        _store(cache, data)
    return OnnxBackend.from_bytes(data, str(loaded.path or "<memory>"))


def _sidecar_export(checkpoint: Path, digest: str) -> OnnxBackend | None:
    """``X.onnx`` beside ``X.pth`` when it was exported from exactly these bytes (else None: stale or foreign)."""
    path = checkpoint.with_suffix(".onnx")
    if path == checkpoint or not path.is_file():
        return None
    try:
        backend = OnnxBackend.from_bytes(str(path), str(path))
    except CheckpointError:
        return None  # an unreadable sidecar only costs the export it would have saved
    return backend if backend.metadata.get("mnistrec.source_sha256") == digest else None


def _export_cache_path(digest: str, temperature: float) -> Path:
    """Where the ONNX export of the checkpoint file with SHA-256 ``digest`` is cached."""
    from .export import OPSET

    key = hashlib.sha256(f"{digest}|{torch.__version__}|{OPSET}|{temperature}".encode()).hexdigest()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mnistrec" / "onnx" / f"{key[:32]}.onnx"


def _store(path: Path, data: bytes) -> None:
    """Write the cache file atomically; a cache that cannot be written only costs the next export."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda fh: fh.write(data))
    except OSError:
        pass
