"""Finding the ink in a greyscale picture: polarity, uneven lighting, threshold, specks.

:func:`find_ink` is shared by :func:`mnistrec.preprocess.preprocess` (one digit)
and :func:`mnistrec.segment.split_digits` (several).

Two routes, chosen by measuring the picture, never by trusting the caller:

* a **clean background** (a canvas drawing, an MNIST-like array, a scan: at least
  97 % of the border within 0.02 of its median) has no lighting to correct: the
  paper level is that median, and the lighting estimate is skipped;
* anything else (photos, shadows, noise) gets the full treatment: a median-filtered
  polarity estimate and a smooth background surface subtracted (:func:`_background`).

On a clean picture both routes give the same ink (the background surface of a
uniform paper is that paper's level); the clean one is several times faster.
For an 8-bit picture (any PNG or JPEG without transparency, such as the web
page's drawing) the clean route runs on its 256 grey levels: histograms and
lookup tables instead of float images (:func:`_clean_ink_of_levels`), with
bit-identical results.
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from .errors import ImageError
from .imagefile import grey_of_levels, grey_or_levels

#: Ink must differ from the paper by at least this much (fraction of full scale), else the image is blank.
MIN_CONTRAST = 0.08
#: A background is clean when this share of the border ring lies within CLEAN_TOLERANCE of its median.
CLEAN_SHARE, CLEAN_TOLERANCE = 0.97, 0.02

INVERT_CHOICES = ("auto", "yes", "no")
_3x3 = np.ones((3, 3), np.uint8)
_SAMPLE = 1 << 18


def quantiles(values: np.ndarray, q: tuple[float, ...]) -> np.ndarray:
    """``np.percentile(values, q)`` (linear interpolation) from one partition: a fraction of its overhead on small arrays.

    Above 2 × 2**18 values (big photos only: 512 × 512 pixels) the quantiles are
    those of 2**18 evenly spread samples, whose error is far below what matters here.
    """
    flat = values.ravel()
    if flat.size > 2 * _SAMPLE:
        flat = flat[_sample_index(flat.size)]
    # Positions in Python floats, not small numpy arrays: the same float64 arithmetic as np.percentile's, without
    # ~20 µs of array overhead per call (four calls per picture).
    last = flat.size - 1
    positions = [p / 100 * last for p in q]
    lows = [math.floor(p) for p in positions]
    part = np.partition(flat, sorted({k for low in lows for k in (low, min(low + 1, last))}))
    return np.array([float(part[low]) + float(part[min(low + 1, last)] - part[low]) * (p - low)
                     for p, low in zip(positions, lows)])


@functools.lru_cache(maxsize=4)
def _sample_index(size: int) -> np.ndarray:
    """The 2**18 evenly spread positions :func:`quantiles` samples from ``size`` values (cached: a photo asks 4 times)."""
    index = np.linspace(0, size - 1, _SAMPLE).astype(np.intp)
    index.flags.writeable = False
    return index


def _otsu_bins(values: np.ndarray, bins: int = 256) -> np.ndarray:
    """The histogram bin of each value in [0, 1]: ``np.histogram(values, bins, range=(0, 1))``'s, except that 1.0
    gets an extra bin (``bins``), which :func:`_otsu_threshold` folds into the last."""
    return (values.reshape(1, -1) * bins).astype(np.uint16)


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold on values in [0, 1] (maximises the between-class variance)."""
    # Counted by OpenCV without np.histogram's sort: its 16-bit histogram with unit-wide bins is exact and ~3x
    # faster than np.bincount (a 12-Mpx photo works on 760k values).
    hist = cv2.calcHist([_otsu_bins(values, bins)], [0], None, [bins + 1], [0, bins + 1]).ravel()
    return _otsu_threshold(hist.astype(np.float64), bins)


def _otsu_threshold(hist: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold from the ``bins + 1`` counts of :func:`_otsu_bins` (float64)."""
    folded = hist[:bins].copy()
    folded[bins - 1] += hist[bins]  # the count of 1.0 joins the last bin, as in np.histogram
    edges, centres = _otsu_edges(bins)
    w0 = np.cumsum(folded)
    w1 = w0[-1] - w0
    m0 = np.cumsum(folded * centres)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


@functools.lru_cache(maxsize=4)
def _otsu_edges(bins: int) -> tuple[np.ndarray, np.ndarray]:
    """The bin edges and centres of Otsu's histogram on [0, 1]."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    return edges, (edges[:-1] + edges[1:]) / 2


def _ink_is_dark(grey: np.ndarray) -> bool:
    """Polarity: is the ink darker than the paper?

    The paper is the median of the image's border ring; the ink is whichever
    extreme lies farther from it (robust percentiles of a 3×3-median-filtered
    copy, so salt-and-pepper noise does not count as ink).
    """
    h, w = grey.shape
    # cv2's 3×3 median replicates the border, as scipy's "reflect" does for a radius of 1.
    smooth = cv2.medianBlur(grey, 3) if min(h, w) >= 3 else grey
    paper = float(quantiles(_border(smooth), (50,))[0])
    return _darker(paper, *quantiles(smooth, (0.5, 99.5)))


def _border(grey: np.ndarray) -> np.ndarray:
    """The pixels of the border ring (5 % of the shorter side, at least 1 px), where the paper shows."""
    h, w = grey.shape
    ring = max(1, round(0.05 * min(h, w)))
    return np.concatenate([grey[:ring].ravel(), grey[-ring:].ravel(), grey[:, :ring].ravel(), grey[:, -ring:].ravel()])


def _darker(paper: float, low: float, high: float) -> bool:
    """Is the ink darker than ``paper``? The ink is the robust extreme (``low`` / ``high``: the picture's 0.5 / 99.5
    percentiles) farther from it."""
    dark, bright = paper - float(low), float(high) - paper
    if abs(dark - bright) < 1e-3:
        return paper > 0.5
    return dark > bright


def _clean_paper(grey: np.ndarray) -> float | None:
    """The paper's level when the background is clean (no lighting to correct), else None."""
    border = _border(grey)
    paper = float(quantiles(border, (50,))[0])
    share = np.count_nonzero(np.abs(border - paper) <= CLEAN_TOLERANCE) / border.size
    return paper if share >= CLEAN_SHARE else None


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
    # Bilinear with pixel-area-aligned sampling and replicated borders (scipy's zoom, grid_mode=True, "nearest").
    small = cv2.resize(ink_bright, (target[1], target[0]), interpolation=cv2.INTER_LINEAR) if factor < 1 else ink_bright
    window = max(3, round(0.3 * max(small.shape)))
    # A min/max filter gives the same result with replicated borders as with the border ignored.
    opening = cv2.morphologyEx(small, cv2.MORPH_OPEN, np.ones((window, window), np.uint8), borderType=cv2.BORDER_REPLICATE)
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
            coef = _least_squares(terms, values)
            error = values - np.einsum("ni,i->n", terms, coef)
            keep = error < max(3 * float(error.std()), 0.03)
            rows, cols, values = rows[keep], cols[keep], values[keep]
        if float(np.abs(error[keep]).mean()) < 0.04:
            return _quadratic_surface(coef, (h, w), small.shape)
    envelope = ndi.uniform_filter(opening, size=max(1, window // 2), mode="nearest")
    envelope = np.minimum(envelope, opening)  # smoothing must not lift the envelope above the opening
    if factor < 1:
        envelope = cv2.resize(envelope, (w, h), interpolation=cv2.INTER_LINEAR)
    return envelope


def _least_squares(terms: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``np.linalg.lstsq(terms, values)`` for a tall, 6-column design, without multi-threaded BLAS.

    lstsq on the n × 6 design hands the work to OpenBLAS, whose threads spin after
    each call: in the server (no OMP_NUM_THREADS) that doubled the CPU and the
    latency of a PNG request. The 6 × 6 normal equations, summed by einsum's own
    loops (no BLAS), are solved instead; the terms lie in [-1, 1], well conditioned.
    """
    gram = np.einsum("ni,nj->ij", terms, terms)
    rhs = np.einsum("ni,n->i", terms, values.astype(np.float64))
    return np.linalg.lstsq(gram, rhs, rcond=None)[0]  # 6 × 6: min-norm when the paper pixels are degenerate


def _quadratic_surface(coef: np.ndarray, shape: tuple[int, int], small: tuple[int, int]) -> np.ndarray:
    """The fitted quadratic (terms 1, x, y, x², xy, y² on the small grid's [-1, 1] coordinates) at full resolution.

    Evaluated from one row and one column vector (the surface is separable but for
    its xy term), not from a full-size design matrix: O(h·w) float32, no float64 copies.
    """
    h, w = shape
    # Full-resolution coordinates mapped onto the small image's grid, then to [-1, 1] as in the fit.
    y = (np.arange(h) * (small[0] - 1) / max(h - 1, 1)) / max(small[0] - 1, 1) * 2 - 1
    x = (np.arange(w) * (small[1] - 1) / max(w - 1, 1)) / max(small[1] - 1, 1) * 2 - 1
    rows = (coef[0] + coef[2] * y + coef[5] * y * y).astype(np.float32)
    cols = (coef[1] * x + coef[3] * x * x).astype(np.float32)
    surface = np.outer((coef[4] * y).astype(np.float32), x.astype(np.float32))
    surface += rows[:, None]
    surface += cols[None, :]
    return surface


def _clean_signal(grey: np.ndarray, invert: str) -> np.ndarray | None:
    """Ink brightness above a clean, flat paper (the fast route), or None when the full route is needed.

    The full route is needed when the border is not clean paper, and when a forced
    polarity contradicts the measured one (the paper is then the "ink"). Soft,
    blurred strokes on clean paper take this route too: the full route's lighting
    surface is flat there, and the robustness benchmark scored every row the same
    or higher once they did (1,000 digits per row: robustness_clean_route_before.json
    against robustness.json in benchmarks/results/).
    """
    paper = _clean_paper(grey)
    if paper is None:
        return None
    dark = _darker(paper, *quantiles(grey, (0.5, 99.5)))
    if invert != "auto" and dark != (invert == "yes"):
        return None
    return np.clip((paper - grey) if dark else (grey - paper), 0.0, 1.0)


def find_ink(image: Image.Image | np.ndarray, invert: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Soft ink image in [0, 1] (ink = 1) and its boolean mask, at working resolution."""
    if invert not in INVERT_CHOICES:
        raise ImageError(f"invert must be one of {', '.join(INVERT_CHOICES)}, not {invert!r}")
    levels, grey = grey_or_levels(image)  # the picture is converted once, whichever route it takes
    if levels is not None:
        found = _clean_ink_of_levels(levels, invert) if levels.size <= 2 * _SAMPLE else None
        if found is not None:
            return found
        grey = grey_of_levels(levels)
    signal = _clean_signal(grey, invert)
    if signal is None:
        dark = _ink_is_dark(grey) if invert == "auto" else invert == "yes"
        bright = 1.0 - grey if dark else grey
        signal = np.clip(bright - _background(bright), 0.0, 1.0)
    peak = float(quantiles(signal, (99.9,))[0]) if signal.size > 1000 else float(signal.max())
    _check_contrast(peak)
    threshold = max(_otsu(np.clip(signal / peak, 0, 1)) * peak, MIN_CONTRAST / 2)
    mask = _drop_specks(signal > threshold)
    if not mask.any():
        raise ImageError(BLANK)
    # Ink level = typical stroke-core brightness; edges keep their grey (anti-aliasing) up to 1 px outside the mask.
    level = max(float(quantiles(signal[mask], (75,))[0]), MIN_CONTRAST)
    near = cv2.dilate(mask.view(np.uint8), _3x3).view(bool)
    soft = np.where(near, np.clip(signal / level, 0.0, 1.0), 0.0).astype(np.float32)
    return soft, mask


BLANK = "no ink found: the image is blank (no stroke differs from the background)"


def _check_contrast(peak: float) -> None:
    if peak < MIN_CONTRAST:
        raise ImageError(BLANK)


#: What to_grey reads for each 8-bit level (grey_of_levels of 0..255).
_LEVEL_GREY = grey_of_levels(np.arange(256, dtype=np.uint8))


def _level_quantiles(values: np.ndarray, counts: np.ndarray, q: tuple[float, ...], descending: bool = False) -> np.ndarray:
    """:func:`quantiles` of a picture whose ``counts[k]`` pixels of level ``k`` have the value ``values[k]``: the same
    order statistics and the same arithmetic, from 256 levels instead of every pixel.

    ``values`` must be monotone in the level: non-decreasing, or non-increasing with
    ``descending=True`` (the ink signal of dark ink), so the levels need no sort.
    """
    if descending:
        values, counts = values[::-1], counts[::-1]
    cumulative = np.cumsum(counts)
    last = int(cumulative[-1]) - 1
    positions = [p / 100 * last for p in q]
    lows = [math.floor(p) for p in positions]
    # The value of rank r (0-based) is that of the first level whose cumulative count exceeds r.
    ranks = np.searchsorted(cumulative, [r for low in lows for r in (low, min(low + 1, last))], side="right")
    ranked = values[ranks]
    return np.array([float(ranked[2 * i]) + float(ranked[2 * i + 1] - ranked[2 * i]) * (p - low)
                     for i, (p, low) in enumerate(zip(positions, lows))])


def _clean_ink_of_levels(levels: np.ndarray, invert: str) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`find_ink`'s clean route for an 8-bit picture, or None when the full route is needed.

    Every pixel of level ``k`` has the same grey, the same ink signal and the same
    side of the threshold, so the route's statistics (paper, polarity, peak, Otsu,
    ink level) are taken from 256-level histograms, and the images come from
    lookup tables. The result is identical to the float route's, bit for bit
    (tests/test_preprocess_speed.py), at a fraction of the cost on a canvas.
    """
    border = np.bincount(_border(levels), minlength=256)
    paper = float(_level_quantiles(_LEVEL_GREY, border, (50,))[0])
    if border[np.abs(_LEVEL_GREY - paper) <= CLEAN_TOLERANCE].sum() / border.sum() < CLEAN_SHARE:
        return None
    counts = cv2.calcHist([levels], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    dark = _darker(paper, *_level_quantiles(_LEVEL_GREY, counts, (0.5, 99.5)))
    if invert != "auto" and dark != (invert == "yes"):
        return None
    signal = np.clip((paper - _LEVEL_GREY) if dark else (_LEVEL_GREY - paper), 0.0, 1.0)
    peak = float(_level_quantiles(signal, counts, (99.9,), dark)[0]) if levels.size > 1000 else float(signal[counts > 0].max())
    _check_contrast(peak)
    hist = np.bincount(_otsu_bins(np.clip(signal / peak, 0, 1)).ravel(), weights=counts, minlength=257)
    threshold = max(_otsu_threshold(hist) * peak, MIN_CONTRAST / 2)
    mask = _drop_specks(cv2.LUT(levels, (signal > threshold).view(np.uint8)).view(bool))
    x, y, w, h = cv2.boundingRect(mask.view(np.uint8))
    if w == 0:
        raise ImageError(BLANK)
    # The soft ink is 0 beyond the mask's box and its 1-px rim: the rest works within that window.
    window = (slice(max(y - 1, 0), y + h + 1), slice(max(x - 1, 0), x + w + 1))
    ink_levels, ink_mask = levels[window], mask[window]
    level = max(float(_level_quantiles(signal, np.bincount(ink_levels[ink_mask], minlength=256), (75,), dark)[0]),
                MIN_CONTRAST)
    soft = np.zeros(levels.shape, np.float32)
    soft[window] = cv2.LUT(ink_levels, np.clip(signal / level, 0.0, 1.0))
    soft[window] *= cv2.dilate(ink_mask.view(np.uint8), _3x3)  # near the strokes (the dilated mask is 0 or 1)
    return soft, mask


def _drop_specks(mask: np.ndarray, fraction: float = 0.04) -> np.ndarray:
    """Remove connected components smaller than ``fraction`` of the largest (noise), 8-connected."""
    # Labelled within the ink's bounding box only (every component lies inside it): half the work on a canvas.
    # Labels alone, then sizes by bincount: OpenCV's WithStats variant costs ~10x more (157 vs 16 µs at 140 px).
    x, y, w, h = cv2.boundingRect(mask.view(np.uint8))
    if w == 0:  # no ink
        return mask
    count, labels = cv2.connectedComponents(mask[y : y + h, x : x + w].view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    if count <= 2:  # background and at most one component
        return mask
    sizes = np.bincount(labels.ravel(), minlength=count)
    keep = sizes >= max(2, fraction * sizes[1:].max())
    keep[0] = False
    kept = np.zeros_like(mask)
    kept[y : y + h, x : x + w] = keep[labels]
    return kept
