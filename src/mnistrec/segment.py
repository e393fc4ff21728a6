"""Several digits in one picture (``mnistrec predict --multi``): ink components merged and split into digits."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from scipy import ndimage as ndi

from .field import to_field
from .ink import find_ink


def _digit_boxes(mask: np.ndarray) -> list[np.ndarray]:
    """Masks of single digits, left to right: connected components, merged and split.

    * pieces of one digit (a 5 whose bar is detached, a broken 4) overlap
      horizontally with each other: components whose column ranges overlap by more
      than half of the narrower one are merged;
    * touching digits form one component much wider than a digit is tall: it is
      cut at the columns with the least ink near evenly spaced positions.
    """
    labels, count = ndi.label(mask, structure=np.ones((3, 3), bool))
    slices = ndi.find_objects(labels)
    groups: list[dict] = []
    for index, sl in enumerate(slices, start=1):
        groups.append({"ids": [index], "x0": sl[1].start, "x1": sl[1].stop, "y0": sl[0].start, "y1": sl[0].stop})
    groups.sort(key=lambda g: (g["x0"] + g["x1"]) / 2)
    merged = True
    while merged:
        merged = False
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                a, b = groups[i], groups[j]
                overlap = min(a["x1"], b["x1"]) - max(a["x0"], b["x0"])
                if overlap > 0.5 * min(a["x1"] - a["x0"], b["x1"] - b["x0"]):
                    groups[i] = {"ids": a["ids"] + b["ids"], "x0": min(a["x0"], b["x0"]), "x1": max(a["x1"], b["x1"]),
                                 "y0": min(a["y0"], b["y0"]), "y1": max(a["y1"], b["y1"])}
                    del groups[j]
                    merged = True
                    break
            if merged:
                break
    groups.sort(key=lambda g: g["x0"])
    height = max(g["y1"] - g["y0"] for g in groups)
    digits: list[np.ndarray] = []
    for g in groups:
        piece = np.isin(labels, g["ids"])
        width = g["x1"] - g["x0"]
        # A handwritten digit is rarely wider than tall (MNIST: width/height ≤ 1.1 for 99 %).
        parts = int(round(width / (0.75 * height))) if width > 1.15 * height else 1
        if parts <= 1:
            digits.append(piece)
            continue
        column_ink = piece[:, g["x0"] : g["x1"]].sum(0).astype(np.float64)
        cuts = [g["x0"]]
        for k in range(1, parts):
            guess = k * width / parts
            lo, hi = int(guess - 0.25 * width / parts), int(guess + 0.25 * width / parts) + 1
            cuts.append(g["x0"] + lo + int(np.argmin(column_ink[lo:hi])))
        cuts.append(g["x1"])
        for x0, x1 in zip(cuts[:-1], cuts[1:]):
            part = np.zeros_like(piece)
            part[:, x0:x1] = piece[:, x0:x1]
            if part.any():
                digits.append(part)
    return digits


def split_digits(image: Image.Image | np.ndarray, invert: str = "auto") -> list[torch.Tensor]:
    """Each digit of a written number as an MNIST-style ``[1, 28, 28]`` tensor, left to right.

    Uses the same ink detection as :func:`mnistrec.preprocess.preprocess`, then :func:`_digit_boxes`.
    Raises :class:`ImageError` when there is no ink.
    """
    soft, mask = find_ink(image, invert)
    tensors = []
    for part in _digit_boxes(mask):
        near = ndi.binary_dilation(part, structure=np.ones((3, 3), bool))
        tensors.append(to_field(np.where(near, soft, 0.0).astype(np.float32), part))
    return tensors
