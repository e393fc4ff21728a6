"""Export a checkpoint to ONNX or TorchScript, checked and verified against PyTorch.

Both formats take the same input as every mnistrec model: ``float32 [N, 1, 28, 28]``
pixels in **[0, 1]** (ink = 1, background = 0, as in MNIST), and return ``[N, 10]``
logits. The MNIST normalisation ``(x - 0.1307) / 0.3081`` is part of the exported
graph, so a consumer only divides 8-bit pixels by 255; it must not normalise again.

The logits are **calibrated**: a checkpoint's temperature ``T`` (:mod:`mnistrec.calibration`)
is folded into the graph as one multiplication by ``1 / T``, so ``softmax`` of the
output gives the same probabilities as ``mnistrec predict``. The metadata records
``mnistrec.temperature`` (``1.0``: the checkpoint had no calibration).

ONNX uses PyTorch's ``torch.export``-based exporter (``dynamo=True``, the default
since PyTorch 2.9; it needs ``onnxscript``). The legacy TorchScript-based exporter
also works offline and is ~10x faster to run, but it is deprecated and prints a
warning on every call; the new one is the maintained path and emits a cleaner graph
(constant-folded, ``Gemm``/``Conv`` fused). The batch axis is dynamic (``batch``).
Opset 20 is the exporter's own default, so no version conversion runs, and
onnxruntime 1.32 supports it fully.

Every export is checked before it is written: ``onnx.checker`` (full check, with
shape inference) for ONNX, then the exported model is run (onnxruntime /
``torch.jit``) on a random batch and must match PyTorch within ``1e-4``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import load_checkpoint
from .fileio import atomic_write, file_sha256
from .onnx_session import OnnxBackend
from .errors import MnistrecError

OPSET = 20
OPSETS = range(18, 24)  # what the torch.export exporter emits and onnxruntime 1.32 runs (each checked by hand)
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
INPUT_DESCRIPTION = (
    "float32 [N, 1, 28, 28]: grey pixels in [0, 1] (8-bit value / 255), ink = 1, background = 0 as in MNIST; "
    "the MNIST normalisation is inside the graph, do not normalise again"
)
OUTPUT_DESCRIPTION = ("float32 [N, 10]: calibrated logits for the digits 0-9 (the checkpoint's temperature is inside "
                      "the graph; softmax gives calibrated probabilities)")
TOLERANCE = 1e-4
FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}


def export_metadata(model_name: str, model_kwargs: dict[str, Any] | None = None, **extra: Any) -> dict[str, str]:
    """String key/value pairs stored in the exported file (ONNX ``metadata_props``, TorchScript extra file)."""
    from . import __version__

    meta = {
        "mnistrec.model": model_name,
        "mnistrec.model_kwargs": json.dumps(model_kwargs or {}, sort_keys=True),
        "mnistrec.input": INPUT_DESCRIPTION,
        "mnistrec.output": OUTPUT_DESCRIPTION,
        "mnistrec.version": __version__,
        "torch.version": str(torch.__version__),
    }
    meta.update({f"mnistrec.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    return meta


def _example_batch(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def onnx_model_proto(model: nn.Module, metadata: dict[str, str] | None = None, opset: int = OPSET):
    """The model as a checked ``onnx.ModelProto`` with a dynamic batch axis (in memory, nothing written)."""
    import onnx

    model = model.eval()
    # The exporter logs a warning per torchvision operator it cannot register; we never use torchvision.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation chatter from inside torch.export, not actionable here
        program = torch.onnx.export(
            model, (_example_batch(),), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            opset_version=opset, dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False, optimize=True,
        )
    proto = program.model_proto
    proto.doc_string = f"mnistrec digit classifier. Input '{INPUT_NAME}': {INPUT_DESCRIPTION}. Output '{OUTPUT_NAME}': {OUTPUT_DESCRIPTION}."
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    return proto


def torchscript_bytes(model: nn.Module, metadata: dict[str, str] | None = None) -> tuple[torch.jit.ScriptModule, bytes]:
    """The model as TorchScript and its serialised archive (``metadata`` in the extra file ``mnistrec.json``).

    ``torch.jit.script`` keeps the batch size symbolic; ``torch.jit.trace`` serves
    the models that script cannot compile.
    """
    model = model.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream in favour of torch.export, but it is still what libtorch (C++) loads.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            module = torch.jit.script(model)
        except Exception:  # script rejects some Python constructs; tracing records the ops that ran instead
            with torch.no_grad():
                module = torch.jit.trace(model, _example_batch(), check_inputs=[(_example_batch(3, 1),)])
        torch.jit.save(module, buffer, _extra_files={"mnistrec.json": json.dumps(metadata or {})})
    return module, buffer.getvalue()


def verify(reference: nn.Module, run, images: torch.Tensor, tolerance: float = TOLERANCE) -> float:
    """Largest absolute logit difference between ``reference`` and ``run`` on ``images``; raise if over ``tolerance``."""
    with torch.inference_mode():
        expected = reference.eval()(images)
    got = run(images)
    diff = float((got - expected).abs().max()) if len(images) else 0.0
    if not diff <= tolerance:
        raise MnistrecError(f"exported model differs from PyTorch by {diff:.3g} (> {tolerance:g}); not writing it")
    return diff


def export_checkpoint(checkpoint: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None, opset: int = OPSET) -> Path:
    """Export ``checkpoint`` (a .pth) to ``out`` in ``fmt`` (``onnx`` or ``torchscript``); returns the path written.

    The file is only written (atomically) after it passed the checker and matched
    PyTorch on a random batch of 8 and on a single image.
    """
    if fmt not in FORMATS:
        raise MnistrecError(f"unknown export format {fmt!r}; choose from: {', '.join(FORMATS)}")
    if opset not in OPSETS:
        raise MnistrecError(f"--opset {opset} is not supported; choose {OPSETS.start}..{OPSETS.stop - 1} (default {OPSET})")
    loaded = load_checkpoint(checkpoint)
    out = Path(out) if out else Path(checkpoint).with_suffix(SUFFIXES[fmt])
    if out.resolve() == Path(checkpoint).resolve():
        raise MnistrecError(f"refusing to overwrite the checkpoint {checkpoint} with its export; choose another -o")
    model = loaded.inference_model  # logits / T: the temperature becomes part of the graph
    # source_sha256 lets the ``auto`` backend use this file in place of exporting ``checkpoint`` again.
    meta = export_metadata(loaded.model_name, loaded.model_kwargs, source=Path(checkpoint).name,
                           source_sha256=file_sha256(checkpoint), temperature=loaded.temperature,
                           **({"opset": str(opset)} if fmt == "onnx" else {}))
    samples = [_example_batch(8, 1), _example_batch(1, 2)]  # another batch size than the one exported with
    if fmt == "onnx":
        data = onnx_model_proto(model, meta, opset).SerializeToString()
        backend = OnnxBackend.from_bytes(data)
        for images in samples:
            verify(model, backend.predict_logits, images)
        atomic_write(out, lambda fh: fh.write(data))
    else:
        _, data = torchscript_bytes(model, meta)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            reloaded = torch.jit.load(io.BytesIO(data))  # verify what is written, not the object in memory
        for images in samples:
            verify(model, lambda x: reloaded(x).detach(), images)
        atomic_write(out, lambda fh: fh.write(data))
    return out
