"""MNIST's normalisation of a digit's ink: crop, pen width, longer side to 20 px, centre of mass in 28×28."""

from __future__ import annotations

import cv2
import numpy as np
import torch
from PIL import Image

from .errors import ImageError

#: Longer side of the digit's box, and the field it is centred in, as in MNIST.
BOX, FIELD, CENTRE = 20, 28, 14.0
#: Stroke width (2 × ridge distance − 1) of MNIST digits in their 20-px box: mean 1.85, 10–90 % range 1.1–3.0.
#: Thinner strokes are thickened to the mean.
STROKE_MIN, STROKE_TARGET = 1.1, 1.8


def _distance_to_zero(mask: np.ndarray, precision: int = cv2.DIST_MASK_PRECISE) -> np.ndarray:
    """Euclidean distance of each True pixel to the nearest False one: exact (as scipy's distance_transform_edt)
    with the default ``precision``; ``cv2.DIST_MASK_5`` is a 5x5 chamfer approximation (within ~2 %), 5x faster.

    A mask with no False pixel has no distance to measure: it is padded with a
    False border first (scipy would return distances to nothing).
    """
    if mask.all():
        padded = np.pad(mask, 1)
        return cv2.distanceTransform(padded.view(np.uint8), cv2.DIST_L2, precision)[1:-1, 1:-1]
    return cv2.distanceTransform(np.ascontiguousarray(mask).view(np.uint8), cv2.DIST_L2, precision)


def _stroke_width(mask: np.ndarray) -> float:
    """Typical stroke width in pixels: 2 × mean distance-to-background on the ridge − 1 (1 for a 1-px line).

    Measured on a 3×3-median-smoothed mask (united with the mask) so that noise
    nibbling at the edges of a stroke does not make it look thin.
    """
    mask = np.ascontiguousarray(mask)
    if min(mask.shape) >= 3:
        # cv2's 3×3 median and max replicate the border, as scipy's "reflect" does for a radius of 1.
        mask = mask | cv2.medianBlur(mask.view(np.uint8), 3).view(bool)
    # A mean over the ridge does not need exact distances: the chamfer approximation costs 33 instead of 162 µs
    # on a 140-px canvas (the largest single cost of a drawing's preprocessing).
    edt = _distance_to_zero(mask, cv2.DIST_MASK_5)
    ridge = mask & (edt >= cv2.dilate(edt, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_REPLICATE))
    return float(2 * edt[ridge].mean() - 1) if ridge.any() else 1.0


def _thicken(soft: np.ndarray, mask: np.ndarray, scale: float) -> np.ndarray:
    """Thicken hairlines so that, once scaled by ``scale``, they are as wide as MNIST's pen strokes.

    A thin pen on a big picture would otherwise shrink to a faint sub-pixel line.
    Dilation by r uses a distance transform (cost independent of r): ``distance
    to ink <= r``, with a 1-px ramp that keeps the edge anti-aliased. Bold pens are
    left alone: thinning them was measured to hurt (benchmarks/bench_robustness.py).
    """
    width = _stroke_width(mask) * scale
    if width >= STROKE_MIN:
        return soft
    radius = (STROKE_TARGET - width) / (2 * scale)
    outside = _distance_to_zero(~mask)
    return np.maximum(soft, np.clip(radius + 1.0 - outside, 0.0, 1.0)).astype(np.float32)


def to_field(soft: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """Crop to the mask's box, fix the stroke width, longer side -> 20 px, centre of mass -> (14, 14) in 28×28."""
    rows = np.flatnonzero(mask.any(1))
    cols = np.flatnonzero(mask.any(0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    # Keep the 1-px anti-aliased rim around the box.
    top, left = max(0, top - 1), max(0, left - 1)
    bottom, right = min(mask.shape[0], bottom + 1), min(mask.shape[1], right + 1)
    crop, crop_mask = soft[top:bottom, left:right], mask[top:bottom, left:right]
    box_h, box_w = crop_mask.any(1).sum(), crop_mask.any(0).sum()
    scale = BOX / max(box_h, box_w)
    crop = _thicken(crop, crop_mask, scale)
    h, w = crop.shape
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    # Pillow's LANCZOS widens its kernel when shrinking, i.e. it anti-aliases.
    small = Image.fromarray(crop.astype(np.float32), mode="F").resize((new_w, new_h), Image.Resampling.LANCZOS)
    small = np.clip(np.asarray(small, dtype=np.float32), 0.0, 1.0)
    if new_h > FIELD or new_w > FIELD:  # the rim may add a pixel or two beyond 20
        small = small[:FIELD, :FIELD]
        new_h, new_w = small.shape
    if small.sum() <= 0:
        raise ImageError("no ink found: the strokes vanished when scaled to 20 px")
    total = float(small.sum())
    cy = float(small.sum(1) @ np.arange(small.shape[0])) / total
    cx = float(small.sum(0) @ np.arange(small.shape[1])) / total
    y0 = int(np.clip(round(CENTRE - cy), 0, FIELD - new_h))
    x0 = int(np.clip(round(CENTRE - cx), 0, FIELD - new_w))
    field = np.zeros((FIELD, FIELD), np.float32)
    field[y0 : y0 + new_h, x0 : x0 + new_w] = small
    return torch.from_numpy(field)[None]
