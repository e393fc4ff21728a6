"""Checkpoints: weights plus everything needed to rebuild and trust the model.

Saved with ``torch.save`` as a plain dict of tensors and primitives, and loaded
with ``torch.load(weights_only=True)``, whose restricted unpickler refuses any
object that could run code. A bare ``state_dict`` saved the seed's way
(``torch.save(model.state_dict(), "mnist_model.pth")``) is accepted too.
Writes go through :func:`mnistrec.fileio.atomic_write`, so a crash or a full disk
never leaves a half-written file under the real name.
"""

from __future__ import annotations

import os
import pickle
import re
import platform
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibration import calibrated, checkpoint_temperature
from .errors import CheckpointError, MnistrecError, first_line
from .fileio import atomic_write
from .models import MNIST_MEAN, MNIST_STD, create_model, meta_model

#: The model shipped inside the package (``make default-model`` writes it); commands use it when given no checkpoint.
DEFAULT_MODEL = "default_model.pth"
FORMAT = "mnistrec-checkpoint"
FORMAT_VERSION = 1


@dataclass
class LoadedModel:
    """A model ready for inference (eval mode) and the metadata it was saved with."""

    model: nn.Module
    model_name: str
    model_kwargs: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    temperature: float = 1.0  # from meta["calibration"]; 1.0 = uncalibrated

    @property
    def inference_model(self) -> nn.Module:
        """The model whose logits are divided by the checkpoint's temperature: use it for every probability shown."""
        return calibrated(self.model, self.temperature)


def library_versions() -> dict[str, str]:
    import numpy

    from . import __version__

    return {
        "mnistrec": __version__,
        "torch": str(torch.__version__),
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def default_checkpoint() -> Path:
    """The path of the shipped default model (package data); a one-line error when this install has none."""
    from importlib.resources import files

    path = Path(str(files("mnistrec") / DEFAULT_MODEL))
    if not path.is_file():
        raise CheckpointError(f"this installation has no default model ({path} is missing; `make default-model` "
                              "writes it): pass a checkpoint with --checkpoint FILE")
    return path


def checkpoint_dict(model_name: str, model_kwargs: dict[str, Any], model: nn.Module, **meta: Any) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name": model_name,
        "model_kwargs": dict(model_kwargs),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "normalization": {"mean": MNIST_MEAN, "std": MNIST_STD, "input": "float pixels in [0, 1], ink = 1"},
        "versions": library_versions(),
        **meta,
    }


def save_checkpoint(path: str | os.PathLike, model_name: str, model_kwargs: dict[str, Any], model: nn.Module, **meta: Any) -> None:
    """Save weights and metadata (recipe, metrics, data checksums, …) atomically."""
    payload = checkpoint_dict(model_name, model_kwargs, model, **meta)
    atomic_write(path, lambda fh: torch.save(payload, fh))


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint file safely into a dict, with one-line errors for every failure."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    _verify_crc(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch names the offending callable as "Unsupported global: GLOBAL module.name".
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"it references {found.group(1)}" if found else "it holds objects that are not plain weights"
        raise CheckpointError(
            f"{path}: refused to load: {what}, which could run code when unpickled; only plain weights are accepted"
        ) from None
    except Exception as exc:  # noqa: BLE001 - a parser of untrusted bytes: junk raises IndexError, TypeError, struct.error, ...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {first_line(exc)}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of weights, found {type(obj).__name__}")
    return obj


def _verify_crc(path: Path) -> None:
    """Check every record of a torch zip checkpoint against the CRC-32 that torch.save wrote.

    torch.load itself does not verify them, so a flipped byte inside the weights
    would otherwise load silently as a different model. A record whose stored CRC
    is 0 is checked all the same (the CRC-32 of its bytes must then be 0, true only
    of an empty record), so a file saved with torch's CRC computation switched off
    is refused rather than trusted unchecked. torch.save never compresses, so a
    compressed record (a possible zip bomb) is refused too. Legacy (non-zip,
    before PyTorch 1.6) files carry no checksum at all and are left to torch.load.
    """
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.compress_type != zipfile.ZIP_STORED:
                    raise CheckpointError(f"{path}: record {info.filename[:80]} is compressed; torch.save never "
                                          "compresses, so this is not a checkpoint it wrote")
                try:
                    with archive.open(info) as record:  # raises BadZipFile on a CRC mismatch at the end
                        while record.read(1 << 22):
                            pass
                except zipfile.BadZipFile:
                    if info.CRC != 0:
                        raise
                    raise CheckpointError(
                        f"{path}: record {info.filename[:80]} carries no checksum (saved with torch's CRC-32 "
                        "switched off), so damage cannot be ruled out; save it again with the default torch.save"
                    ) from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as exc:
        raise CheckpointError(f"{path}: corrupt checkpoint (garbled or truncated): {first_line(exc, 160)}") from None


def _is_state_dict(obj: dict[str, Any]) -> bool:
    return bool(obj) and all(isinstance(k, str) for k in obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def build_model(model_name: str, model_kwargs: dict[str, Any], state_dict: dict[str, Any], source: str) -> nn.Module:
    """Create the named model and load weights strictly, turning mismatches into one line.

    Nothing is allocated for the model until everything has been checked: the
    arguments against the model's declared bounds, its parameter count and the
    shape of every weight against the same model built on the ``meta`` device.
    """
    expected = meta_model(model_name, **model_kwargs).state_dict()
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{source}: its state_dict is a {type(state_dict).__name__}, not a dict of weights")
    missing = [k for k in expected if k not in state_dict]
    unexpected = [str(k) for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{'…' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])[:200]}{'…' if len(unexpected) > 3 else ''}")
        raise CheckpointError(f"{source}: weights do not fit model {model_name!r} ({'; '.join(parts)})")
    for key, tensor in expected.items():
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: weight {key} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{source}: weight {key} has shape {tuple(value.shape)}, "
                f"model {model_name!r} expects {tuple(tensor.shape)}"
            )
    model = create_model(model_name, **model_kwargs)
    model.load_state_dict(state_dict)
    model.eval()
    return model


def load_checkpoint(path: str | os.PathLike) -> LoadedModel:
    """Load a checkpoint (ours or a seed-style bare state_dict) into an eval-mode model."""
    path = Path(path)
    obj = read_checkpoint(path)
    if obj.get("format") == FORMAT:
        if "state_dict" not in obj or "model_name" not in obj:
            raise CheckpointError(f"{path}: checkpoint is missing its state_dict or model name")
        name, kwargs = obj["model_name"], obj.get("model_kwargs") or {}
        if not isinstance(name, str) or not isinstance(kwargs, dict):
            raise CheckpointError(f"{path}: its model name or model_kwargs are malformed")
        kwargs = dict(kwargs)
        meta = {k: v for k, v in obj.items() if k not in ("state_dict", "optimizer", "scheduler", "rng")}
        state = obj["state_dict"]
    elif _is_state_dict(obj):
        # The seed saved only model.state_dict(); its keys are those of our "mlp".
        name, kwargs, meta, state = "mlp", {}, {"format": "bare-state-dict"}, obj
    else:
        raise CheckpointError(f"{path}: not an mnistrec checkpoint nor a state_dict (keys: {', '.join(map(str, list(obj)[:5]))})")
    try:
        model = build_model(name, kwargs, state, str(path))
    except MnistrecError as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path}: {exc}") from None
    return LoadedModel(model, name, kwargs, meta, path, checkpoint_temperature(meta, str(path)))


def with_calibration(path: str | os.PathLike, record: dict[str, Any], out: str | os.PathLike) -> None:
    """Write checkpoint ``path`` to ``out`` (may be the same file, replaced atomically) with ``record`` as its calibration.

    A seed-style bare ``state_dict`` becomes a full mnistrec checkpoint of the ``mlp``
    model, since a bare one has nowhere to keep a temperature.
    """
    obj = read_checkpoint(path)
    if obj.get("format") != FORMAT:
        loaded = load_checkpoint(path)
        obj = checkpoint_dict(loaded.model_name, loaded.model_kwargs, loaded.model, converted_from="bare-state-dict")
    obj = {**obj, "calibration": record}
    checkpoint_temperature(obj, str(out))
    atomic_write(out, lambda fh: torch.save(obj, fh))
