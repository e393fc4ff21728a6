"""Predictions on users' images: the result schema shared by the CLI and the HTTP API, batched inference, file lists.

One prediction is ``{"digit", "confidence", "unsure", "probabilities": [10 floats], "top_k":
[{"digit", "probability"}, ...]}``; the CLI puts ``"path"`` first. A number read
with ``--multi`` is ``{"path", "number": "372", "unsure", "digits": [<one prediction per digit>]}``.

Probabilities are calibrated when the model is (``LoadedModel.inference_model``).
``unsure`` is true when the calibrated confidence is below :data:`UNSURE_BELOW`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from .errors import ImageError, MnistrecError
from .evaluate import predict_logits

#: File name endings ``predict`` picks up inside folders (files named explicitly are always tried).
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".dib", ".gif", ".webp", ".tif", ".tiff"})
#: Below this calibrated confidence a prediction is flagged "not sure" (chosen on the validation split: docs/calibration.md).
UNSURE_BELOW = 0.90
#: Files whose tensors are held in memory at once; also the inference batch.
BATCH_FILES = 256


def predict_tensors(model: nn.Module, x: torch.Tensor, top_k: int = 3, batch_size: int = 1000,
                    unsure_below: float = UNSURE_BELOW) -> list[dict[str, Any]]:
    """One prediction dict per image of ``x`` (float ``[N, 1, 28, 28]`` in [0, 1], ink = 1), in batches.

    ``unsure`` is set when the top probability is below ``unsure_below``.
    """
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or tuple(x.shape[1:]) != (1, 28, 28):
        raise MnistrecError(f"expected images of shape [N, 1, 28, 28], got {list(x.shape)}")
    top_k = max(1, min(int(top_k), 10))
    probabilities = predict_logits(model, x.float(), batch_size=batch_size).softmax(1)
    top_p, top_d = probabilities.topk(top_k, dim=1)
    rows = probabilities.tolist()
    return [
        {
            "digit": int(digits[0]),
            "confidence": float(p[0]),
            "unsure": bool(p[0] < unsure_below),
            "probabilities": [float(v) for v in row],
            "top_k": [{"digit": int(d), "probability": float(q)} for d, q in zip(digits, p)],
        }
        for row, p, digits in zip(rows, top_p.tolist(), top_d.tolist())
    ]


def number_result(digits: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The ``--multi`` result for per-digit predictions given left to right."""
    return {"number": "".join(str(d["digit"]) for d in digits), "unsure": any(d["unsure"] for d in digits),
            "digits": list(digits)}


def expand_paths(paths: Iterable[str | os.PathLike], recursive: bool = False) -> list[Path]:
    """Files named on the command line, plus the images inside named folders (sorted; subfolders with ``recursive``).

    Paths that do not exist are kept, so that the caller reports each of them as a failed file.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            walk = path.rglob("*") if recursive else path.iterdir()
            found.extend(sorted(p for p in walk if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()))
        else:
            found.append(path)
    return found


@dataclass
class FileResult:
    """What happened to one input file: its tensors (one per digit with ``multi``) and result, or an error."""

    path: Path
    result: dict[str, Any] | None = None
    error: str | None = None
    tensors: list[torch.Tensor] = field(default_factory=list)


def load_file(path: Path, invert: str = "auto", multi: bool = False) -> list[torch.Tensor]:
    """Decode and preprocess one file into its ``[1, 28, 28]`` tensor(s); :class:`ImageError` when it cannot."""
    from .preprocess import open_image, preprocess, split_digits

    image = open_image(path, draft=True)
    return split_digits(image, invert) if multi else [preprocess(image, invert)]


def predict_files(
    model: nn.Module,
    paths: Sequence[Path],
    top_k: int = 3,
    invert: str = "auto",
    multi: bool = False,
    batch_files: int = BATCH_FILES,
    on_done: Callable[[int], None] | None = None,
) -> Iterator[FileResult]:
    """Preprocess and classify files in chunks of ``batch_files``; yields one :class:`FileResult` per path, in order.

    Memory is bounded by one chunk: only its tensors are alive at once. A file
    that cannot be read gets ``error`` set and the others go on.
    """
    for start in range(0, len(paths), batch_files):
        chunk = [FileResult(p) for p in paths[start : start + batch_files]]
        for item in chunk:
            try:
                item.tensors = load_file(item.path, invert, multi)
            except ImageError as exc:
                item.error = str(exc)
            except MemoryError:
                item.error = "image too large to process in the available memory"
            if on_done:
                on_done(1)
        ok = [item for item in chunk if item.error is None]
        stacked = [t for item in ok for t in item.tensors]
        predictions = predict_tensors(model, torch.stack(stacked), top_k) if stacked else []
        position = 0
        for item in ok:
            mine = predictions[position : position + len(item.tensors)]
            position += len(item.tensors)
            item.result = {"path": str(item.path), **(number_result(mine) if multi else mine[0])}
        yield from chunk


def occlusion_saliency(model: nn.Module, x: torch.Tensor, targets: Sequence[int] | None = None, patch: int = 4) -> torch.Tensor:
    """Occlusion saliency ``[N, 28, 28]``: how much the target's probability drops when a patch around a pixel is blanked.

    Every ``patch``×``patch`` window (stride 1) of every image is set to 0 (paper)
    in one batched forward pass per image; a pixel's saliency is the mean drop
    over the windows covering it. Positive = evidence for the target digit.
    """
    if x.ndim == 3:
        x = x[:, None]
    base = predict_logits(model, x.float()).softmax(1)
    targets = base.argmax(1).tolist() if targets is None else list(targets)
    positions = [(r, c) for r in range(28 - patch + 1) for c in range(28 - patch + 1)]
    masks = torch.ones(len(positions), 1, 28, 28)
    for i, (r, c) in enumerate(positions):
        masks[i, :, r : r + patch, c : c + patch] = 0
    cover = 1 - masks[:, 0]  # [P, 28, 28], 1 where window i blanks the pixel
    maps = []
    for image, target, p0 in zip(x, targets, base[torch.arange(len(x)), targets].tolist()):
        probs = predict_logits(model, image[None] * masks).softmax(1)[:, target]
        drop = (p0 - probs)[:, None, None] * cover
        maps.append(drop.sum(0) / cover.sum(0))
    return torch.stack(maps) if maps else torch.empty(0, 28, 28)


def save_preprocessed(item: FileResult, directory: str | os.PathLike) -> list[Path]:
    """Write the 28×28 tensor(s) the model saw as 8-bit PNG (ink white, as MNIST) named after the input file.

    ``DIR/<stem>.png``, or ``DIR/<stem>_<i>.png`` per digit with ``--multi``; a
    numeric suffix avoids overwriting when two inputs share a name.
    """
    import numpy as np
    from PIL import Image

    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MnistrecError(f"cannot create {directory}: {exc.strerror or exc}") from None
    written = []
    multi = item.result is not None and "number" in item.result
    for index, tensor in enumerate(item.tensors):
        stem = f"{item.path.stem}_{index}" if multi else item.path.stem
        target, n = directory / f"{stem}.png", 1
        while target.exists():
            n += 1
            target = directory / f"{stem}-{n}.png"
        pixels = (tensor.reshape(28, 28).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        try:
            Image.fromarray(pixels, mode="L").save(target)
        except OSError as exc:
            raise MnistrecError(f"cannot write {target}: {exc.strerror or exc}") from None
        written.append(target)
    return written


def explain_rows(model: nn.Module, items: Sequence[FileResult], limit: int = 12) -> list[dict[str, Any]]:
    """Rows for :func:`mnistrec.plots.explain_figure`: one per image (per digit with ``--multi``), at most ``limit``."""
    from .preprocess import open_image

    rows = []
    for item in items:
        picture = open_image(item.path)
        picture.thumbnail((256, 256))
        picture = picture.convert("RGBA") if "A" in picture.getbands() or picture.mode == "P" else picture.convert("RGB")
        digits = item.result["digits"] if "digits" in item.result else [item.result]
        for index, (tensor, result) in enumerate(zip(item.tensors, digits)):
            title = item.path.name + (f" (digit {index + 1} of {len(digits)})" if "digits" in item.result else "")
            rows.append({"title": title, "input": picture, "tensor": tensor, "probabilities": result["probabilities"]})
    rows = rows[:limit]
    if rows:
        saliency = occlusion_saliency(model, torch.stack([r["tensor"] for r in rows]))
        for row, sal in zip(rows, saliency):
            row["saliency"] = sal
    return rows
