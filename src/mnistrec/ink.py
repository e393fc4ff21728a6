"""Finding the ink in a greyscale picture: polarity, uneven lighting, threshold, specks.

:func:`find_ink` is shared by :func:`mnistrec.preprocess.preprocess` (one digit)
and :func:`mnistrec.segment.split_digits` (several).
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from .errors import ImageError
from .imagefile import to_grey

#: Ink must differ from the paper by at least this much (fraction of full scale), else the image is blank.
MIN_CONTRAST = 0.08

INVERT_CHOICES = ("auto", "yes", "no")


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold on values in [0, 1] (maximises the between-class variance)."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def _ink_is_dark(grey: np.ndarray) -> bool:
    """Polarity: is the ink darker than the paper?

    The paper is the median of the image's border ring; the ink is whichever
    extreme lies farther from it (robust percentiles of a 3×3-median-filtered
    copy, so salt-and-pepper noise does not count as ink).
    """
    h, w = grey.shape
    smooth = ndi.median_filter(grey, size=3) if min(h, w) >= 3 else grey
    ring = max(1, round(0.05 * min(h, w)))
    border = np.concatenate([smooth[:ring].ravel(), smooth[-ring:].ravel(), smooth[:, :ring].ravel(), smooth[:, -ring:].ravel()])
    paper = float(np.median(border))
    low, high = np.percentile(smooth, [0.5, 99.5])
    dark, bright = paper - float(low), float(high) - paper
    if abs(dark - bright) < 1e-3:
        return paper > 0.5
    return dark > bright


def _background(ink_bright: np.ndarray) -> np.ndarray:
    """The paper's brightness under the strokes (uneven lighting), computed at ≤ 96 px on the longer side.

    First a morphological opening with a window wider than any stroke: it removes
    the strokes and keeps lighting gradients, except within half a window of the
    borders. The pixels it calls paper are then fitted with a smooth quadratic
    surface, which has no such border error (shadows and vignetting are smooth);
    if the quadratic does not fit the paper (a hard shadow edge), the opening is used.
    """
    h, w = ink_bright.shape
    factor = min(1.0, 96.0 / max(h, w))
    # Per-axis zoom to at least one pixel: a 1-px-high strip must not zoom to an empty array.
    target = (max(1, round(h * factor)), max(1, round(w * factor)))
    small = ndi.zoom(ink_bright, (target[0] / h, target[1] / w), order=1, grid_mode=True, mode="nearest") if factor < 1 else ink_bright
    window = max(3, int(round(0.3 * max(small.shape))))
    opening = ndi.grey_opening(small, size=(window, window), mode="nearest")
    residual = small - opening
    spread = 1.4826 * float(np.median(np.abs(residual - np.median(residual))))
    paper = residual < max(3 * spread, 0.03)

    def design(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        y = rows / max(shape[0] - 1, 1) * 2 - 1
        x = cols / max(shape[1] - 1, 1) * 2 - 1
        return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], -1)

    if paper.sum() >= 0.2 * paper.size and paper.size >= 36:
        rows, cols = np.nonzero(paper)
        values = small[rows, cols]
        coef = None
        for _ in range(2):  # refit without the pixels the first fit calls ink
            terms = design(rows.astype(np.float64), cols.astype(np.float64), small.shape)
            coef, *_ = np.linalg.lstsq(terms, values, rcond=None)
            error = values - terms @ coef
            keep = error < max(3 * float(error.std()), 0.03)
            rows, cols, values = rows[keep], cols[keep], values[keep]
        if float(np.abs(error[keep]).mean()) < 0.04:
            grid_r, grid_c = np.mgrid[0:h, 0:w].astype(np.float64)
            # Full-resolution coordinates mapped onto the small image's grid.
            return (design(grid_r * (small.shape[0] - 1) / max(h - 1, 1), grid_c * (small.shape[1] - 1) / max(w - 1, 1),
                           small.shape) @ coef).astype(np.float32)
    envelope = ndi.uniform_filter(opening, size=max(1, window // 2), mode="nearest")
    envelope = np.minimum(envelope, opening)  # smoothing must not lift the envelope above the opening
    if factor < 1:
        envelope = ndi.zoom(envelope, (h / envelope.shape[0], w / envelope.shape[1]), order=1, grid_mode=True, mode="nearest")[:h, :w]
    return envelope


def find_ink(image: Image.Image | np.ndarray, invert: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Soft ink image in [0, 1] (ink = 1) and its boolean mask, at working resolution."""
    if invert not in INVERT_CHOICES:
        raise ImageError(f"invert must be one of {', '.join(INVERT_CHOICES)}, not {invert!r}")
    grey = to_grey(image)
    dark = _ink_is_dark(grey) if invert == "auto" else invert == "yes"
    bright = 1.0 - grey if dark else grey
    signal = np.clip(bright - _background(bright), 0.0, 1.0)
    peak = float(np.percentile(signal, 99.9)) if signal.size > 1000 else float(signal.max())
    if peak < MIN_CONTRAST:
        raise ImageError("no ink found: the image is blank (no stroke differs from the background)")
    threshold = max(_otsu(np.clip(signal / peak, 0, 1)) * peak, MIN_CONTRAST / 2)
    mask = signal > threshold
    mask = _drop_specks(mask)
    if not mask.any():
        raise ImageError("no ink found: the image is blank (no stroke differs from the background)")
    # Ink level = typical stroke-core brightness; edges keep their grey (anti-aliasing) up to 1 px outside the mask.
    level = max(float(np.percentile(signal[mask], 75)), MIN_CONTRAST)
    near = ndi.binary_dilation(mask, structure=np.ones((3, 3), bool))
    soft = np.where(near, np.clip(signal / level, 0.0, 1.0), 0.0).astype(np.float32)
    return soft, mask


def _drop_specks(mask: np.ndarray, fraction: float = 0.04) -> np.ndarray:
    """Remove connected components smaller than ``fraction`` of the largest (noise), 8-connected."""
    labels, count = ndi.label(mask, structure=np.ones((3, 3), bool))
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    keep = sizes >= max(2, fraction * sizes.max())
    return keep[labels - 1] & mask
