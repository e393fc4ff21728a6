"""MNIST's normalisation of a digit's ink: crop, pen width, longer side to 20 px, centre of mass in 28×28."""

from __future__ import annotations

import functools

import cv2
import numpy as np
import torch

from .errors import ImageError
from .ink import BLANK

#: Longer side of the digit's box, and the field it is centred in, as in MNIST.
BOX, FIELD, CENTRE = 20, 28, 14.0
#: Stroke width (2 × ridge distance − 1) of MNIST digits in their 20-px box: mean 1.85, 10–90 % range 1.1–3.0.
#: Thinner strokes are thickened to the mean.
STROKE_MIN, STROKE_TARGET = 1.1, 1.8
_3x3 = np.ones((3, 3), np.uint8)


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
    ridge = mask & (edt >= cv2.dilate(edt, _3x3, borderType=cv2.BORDER_REPLICATE))
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


# Cached per (size_in, size_out): a canvas's crops come in few sizes. At most 128 × 20 × 1026 × 8 B = 21 MB (photos'
# crops at the 1024-px working size), ~3 MB for canvas-sized crops.
@functools.lru_cache(maxsize=128)
def _lanczos_matrix(size_in: int, size_out: int) -> np.ndarray:
    """Pillow's LANCZOS (a = 3) resampling of one axis as a ``size_out × size_in`` float64 matrix.

    The coefficients of Pillow's ``precompute_coeffs`` (Resample.c): when shrinking,
    the kernel widens by the scale (anti-aliasing); each row is normalised to sum 1
    over the input pixels its (rounded) support covers.
    """
    scale = size_in / size_out
    filter_scale = max(scale, 1.0)
    support = 3.0 * filter_scale
    centre = (np.arange(size_out) + 0.5) * scale
    # Pillow's bounds: (int)(centre ± support + 0.5), truncated toward zero, clipped to the picture.
    low = np.maximum(np.trunc(centre - support + 0.5), 0)[:, None]
    high = np.minimum(np.trunc(centre + support + 0.5), size_in)[:, None]
    x = (np.arange(size_in)[None, :] - centre[:, None] + 0.5) / filter_scale
    inside = (np.arange(size_in)[None, :] >= low) & (np.arange(size_in)[None, :] < high) & (x >= -3.0) & (x < 3.0)
    weights = np.where(inside, np.sinc(x) * np.sinc(x / 3.0), 0.0)
    total = weights.sum(1, keepdims=True)
    matrix = np.divide(weights, total, out=weights.copy(), where=total != 0.0)
    matrix.flags.writeable = False
    return matrix


def _resize_lanczos(image: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """``Image.fromarray(image, "F").resize((new_w, new_h), LANCZOS)`` as two matrix products: the same result to
    float32 rounding (a horizontal pass rounded to float32, then a vertical one, as Pillow does), 3-5x faster on a
    drawing's crop, where Pillow's float resampling was the largest single cost of the preprocessing.

    ``cv2.gemm``, not numpy's ``@``: OpenBLAS would start threads on a big crop, which spin after each call.
    """
    out = image.astype(np.float64)
    if new_w != image.shape[1]:
        out = cv2.gemm(out, _lanczos_matrix(image.shape[1], new_w), 1.0, None, 0.0, flags=cv2.GEMM_2_T)
        out = out.astype(np.float32).astype(np.float64)
    if new_h != image.shape[0]:
        out = cv2.gemm(_lanczos_matrix(image.shape[0], new_h), out, 1.0, None, 0.0)
    return out.astype(np.float32)


def to_field(soft: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """Crop to the mask's box, fix the stroke width, longer side -> 20 px, centre of mass -> (14, 14) in 28×28."""
    x, y, w, h = cv2.boundingRect(np.ascontiguousarray(mask).view(np.uint8))
    if w == 0:
        raise ImageError(BLANK)
    # Keep the 1-px anti-aliased rim around the box.
    top, left = max(0, y - 1), max(0, x - 1)
    bottom, right = min(mask.shape[0], y + h + 1), min(mask.shape[1], x + w + 1)
    crop, crop_mask = soft[top:bottom, left:right], mask[top:bottom, left:right]
    # The box's size counts the rows and columns that hold ink (a gap inside the box does not count).
    scale = BOX / max(int(np.count_nonzero(crop_mask.any(1))), int(np.count_nonzero(crop_mask.any(0))))
    crop = _thicken(crop, crop_mask, scale)
    h, w = crop.shape
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    # Lanczos widens its kernel when shrinking, i.e. it anti-aliases.
    small = np.clip(_resize_lanczos(crop, new_h, new_w), 0.0, 1.0)
    if new_h > FIELD or new_w > FIELD:  # the rim may add a pixel or two beyond 20
        small = small[:FIELD, :FIELD]
        new_h, new_w = small.shape
    total = float(small.sum())
    if total <= 0:
        raise ImageError("no ink found: the strokes vanished when scaled to 20 px")
    cy = float(small.sum(1) @ np.arange(small.shape[0])) / total
    cx = float(small.sum(0) @ np.arange(small.shape[1])) / total
    y0 = min(max(round(CENTRE - cy), 0), FIELD - new_h)
    x0 = min(max(round(CENTRE - cx), 0), FIELD - new_w)
    field = np.zeros((FIELD, FIELD), np.float32)
    field[y0 : y0 + new_h, x0 : x0 + new_w] = small
    return torch.from_numpy(field)[None]
