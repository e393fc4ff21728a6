"""Turn a user's picture into what an MNIST model expects: one function shared by the CLI, the API and the web app.

MNIST itself was made this way (LeCun et al.): the digit is cropped to its ink,
its longer side scaled to 20 pixels keeping the aspect ratio, anti-aliased, and
placed in a 28×28 field so that its centre of mass falls on the field's centre
(row 14, column 14 in 0-based pixel indices: the mean centre of mass of the MNIST
test set is (13.99, 14.00)). User pictures add what MNIST never had, and we undo
it first: EXIF rotation, transparency, dark ink on light paper, uneven lighting,
noise, very thin or very bold pens.

Pipeline (:func:`preprocess`)::

    open_image        decode, EXIF orientation, pixel cap       (PIL.Image)
    _to_grey          alpha composited onto a contrasting background, float [0, 1]
    _ink              polarity (auto|yes|no) -> ink bright; background flattened
                      by a morphological opening (uneven lighting); Otsu threshold;
                      specks removed -> soft ink in [0, 1] and its mask
    _normalise        crop to the ink's box; hairlines thickened to MNIST's pen width;
                      longer side -> 20 px (anti-aliased); 28×28 centred on the mass

A 28×28 array already in MNIST style (light ink on black) is *not* special-cased:
it goes through the same steps. Polarity detection keeps it as it is and, since
MNIST digits already fill a 20-px box centred on their mass, the result is close
to the input (the benchmark's ``mnist-as-is`` row measures how close in terms of
predictions).
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage as ndi

from .errors import ImageError, first_line

#: Largest image (width × height) we decode; bigger files are refused as possible decompression bombs.
MAX_PIXELS = 50_000_000
#: Images are reduced to at most this many pixels on their longer side before any float work (bounded memory).
WORK_SIZE = 1024
#: Longer side of the digit's box, and the field it is centred in, as in MNIST.
BOX, FIELD, CENTRE = 20, 28, 14.0
#: Stroke width (2 × ridge distance − 1) of MNIST digits in their 20-px box: mean 1.85, 10–90 % range 1.1–3.0.
#: Thinner strokes are thickened to the mean.
STROKE_MIN, STROKE_TARGET = 1.1, 1.8
#: Ink must differ from the paper by at least this much (fraction of full scale), else the image is blank.
MIN_CONTRAST = 0.08

INVERT_CHOICES = ("auto", "yes", "no")


# --------------------------------------------------------------------------- decoding


def open_image(source: str | os.PathLike | bytes, max_pixels: int = MAX_PIXELS, draft: bool = False) -> Image.Image:
    """Decode an image file (path or bytes), apply its EXIF orientation and check its size.

    Reads PNG, JPEG, BMP, GIF (first frame), WebP and TIFF in any mode Pillow
    supports (greyscale, RGB, RGBA, palette, 16-bit). Raises :class:`ImageError`
    with a one-line message for a missing or unreadable path, a file that is not
    an image, a truncated or corrupt file, a 0×0 image, or more than
    ``max_pixels`` pixels (checked from the header, before decoding, so a
    decompression bomb never allocates its memory).

    ``draft=True`` lets the JPEG decoder skip detail that :func:`preprocess`
    would average away anyway (it decodes at 1/2, 1/4 or 1/8 scale, never below
    WORK_SIZE on the longer side): a 12-Mpx phone photo then decodes several
    times faster. Other formats ignore it.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError("empty file, not an image")
        fh = io.BytesIO(bytes(source))
    else:
        path = Path(source)
        try:
            fh = open(path, "rb")
        except FileNotFoundError:
            raise ImageError("no such file") from None
        except IsADirectoryError:
            raise ImageError("is a directory, not an image") from None
        except OSError as exc:
            raise ImageError(f"cannot read: {exc.strerror or exc}") from None
    with fh:
        try:
            with warnings.catch_warnings():
                # Pillow only *warns* between MAX_IMAGE_PIXELS and twice that; we enforce our own cap below.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(fh)
                width, height = image.size
                if width == 0 or height == 0:
                    raise ImageError(f"image is {width}×{height} pixels, nothing to read")
                if width * height > max_pixels:
                    raise ImageError(f"image is {width}×{height} = {width * height:,} pixels, more than the "
                                     f"{max_pixels:,} allowed (decompression bomb?)")
                if draft and image.format == "JPEG":
                    # Pillow keeps both sides >= the requested ones: ask for the size preprocess reduces to.
                    factor = WORK_SIZE / max(width, height)
                    image.draft(image.mode, (max(1, int(width * factor)), max(1, int(height * factor))))
                image.load()
        except ImageError:
            raise
        except Image.DecompressionBombError:
            raise ImageError(f"image has more than the {max_pixels:,} pixels allowed (decompression bomb?)") from None
        except UnidentifiedImageError:
            raise ImageError("not an image (or a format Pillow cannot read)") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as exc:
            raise ImageError(f"truncated or corrupt image: {first_line(exc, 160)}") from None
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block must not lose the picture: keep it unrotated
        pass
    return image


# --------------------------------------------------------------------------- to float greyscale


def _pil_to_arrays(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Greyscale float32 in [0, 1] and alpha (or None), reduced to at most WORK_SIZE on the longer side."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        image = image.convert("I") if mode != "I" else image
        scale = 65535.0 if mode.startswith("I;16") or np.asarray(image).max() > 255 else 255.0
        image = Image.fromarray((np.asarray(image, dtype=np.float32) / scale).astype(np.float32), mode="F")
        alpha = None
    elif mode == "F":
        alpha = None
    elif mode == "1":
        image, alpha = image.convert("L"), None
    else:
        has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info)
        if has_alpha:
            la = image.convert("RGBA").convert("LA")
            image, alpha = la.getchannel("L"), la.getchannel("A")
        else:
            image, alpha = image.convert("L"), None
    if max(image.size) > WORK_SIZE:
        factor = WORK_SIZE / max(image.size)
        size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
        # BOX = area averaging: a thin stroke becomes fainter but never disappears.
        image = image.resize(size, Image.Resampling.BOX)
        alpha = alpha.resize(size, Image.Resampling.BOX) if alpha is not None else None
    grey = np.asarray(image, dtype=np.float32)
    if image.mode == "L":
        grey = grey / 255.0
    a = np.asarray(alpha, dtype=np.float32) / 255.0 if alpha is not None else None
    return grey, a


def _array_to_arrays(array: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Accept 2-D grey, HxWx1, HxWx3, HxWx4 (and a leading 1 as in [1,H,W]) of bool/int/float dtype."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[0] == 1 and a.shape[-1] not in (1, 3, 4):
        a = a[0]
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ImageError(f"expected a 2-D greyscale or HxWx3/4 colour array, got shape {tuple(a.shape)}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageError(f"image is {a.shape[1]}×{a.shape[0]} pixels, nothing to read")
    if a.dtype == bool:
        f = a.astype(np.float32)
    elif np.issubdtype(a.dtype, np.integer):
        if a.dtype == np.uint8 or a.dtype == np.int8:
            full = 255.0
        elif a.dtype == np.uint16:
            full = 65535.0
        else:  # int32/int64 arrays usually hold 8-bit (or 16-bit) values
            top = int(a.max())
            full = 255.0 if top <= 255 else 65535.0 if top <= 65535 else float(np.iinfo(a.dtype).max)
        f = a.astype(np.float32) / full
    elif np.issubdtype(a.dtype, np.floating):
        f = np.nan_to_num(a.astype(np.float32))
        if f.max() > 1.0:  # floats in 0..255
            f = f / 255.0
    else:
        raise ImageError(f"unsupported array dtype {a.dtype}")
    f = np.clip(f, 0.0, 1.0)
    if f.ndim == 2:
        return _reduce(f), None
    grey = f[..., 0] * 0.299 + f[..., 1] * 0.587 + f[..., 2] * 0.114  # same luma as PIL's convert("L")
    alpha = f[..., 3] if f.shape[-1] == 4 else None
    return _reduce(grey), _reduce(alpha) if alpha is not None else None


def _reduce(plane: np.ndarray) -> np.ndarray:
    """Area-average a float plane down to WORK_SIZE on its longer side (no-op when already small)."""
    if max(plane.shape) <= WORK_SIZE:
        return plane
    factor = WORK_SIZE / max(plane.shape)
    size = (max(1, round(plane.shape[1] * factor)), max(1, round(plane.shape[0] * factor)))
    pil = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F")
    return np.asarray(pil.resize(size, Image.Resampling.BOX), dtype=np.float32)


def _to_grey(image: Image.Image | np.ndarray) -> np.ndarray:
    """Float32 greyscale in [0, 1], transparency composited onto a background that contrasts with the strokes."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, Image.Image):
        grey, alpha = _pil_to_arrays(image)
    elif isinstance(image, np.ndarray):
        grey, alpha = _array_to_arrays(image)
    else:
        raise ImageError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
    if grey.size == 0:
        raise ImageError(f"image is {grey.shape[-1] if grey.ndim == 2 else 0}×{grey.shape[0]} pixels, nothing to read")
    grey = np.clip(np.nan_to_num(grey.astype(np.float32)), 0.0, 1.0)
    if alpha is not None and float(alpha.min()) < 0.99:
        if float(alpha.max()) < 0.02:
            raise ImageError("no ink found: the image is fully transparent")
        # The strokes are the opaque part; their colour under a transparent pixel is arbitrary
        # (often black). Composite onto the colour that contrasts most with the strokes.
        ink = float((grey * alpha).sum() / max(float(alpha.sum()), 1e-6))
        background = 1.0 if ink < 0.5 else 0.0
        grey = alpha * grey + (1.0 - alpha) * background
    return grey


# --------------------------------------------------------------------------- finding the ink


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


def _ink(image: Image.Image | np.ndarray, invert: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Soft ink image in [0, 1] (ink = 1) and its boolean mask, at working resolution."""
    if invert not in INVERT_CHOICES:
        raise ImageError(f"invert must be one of {', '.join(INVERT_CHOICES)}, not {invert!r}")
    grey = _to_grey(image)
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


# --------------------------------------------------------------------------- MNIST normalisation


def _stroke_width(mask: np.ndarray) -> float:
    """Typical stroke width in pixels: 2 × mean distance-to-background on the ridge − 1 (1 for a 1-px line).

    Measured on a 3×3-median-smoothed mask (united with the mask) so that noise
    nibbling at the edges of a stroke does not make it look thin.
    """
    if min(mask.shape) >= 3:
        mask = mask | ndi.median_filter(mask.astype(np.uint8), size=3).astype(bool)
    edt = ndi.distance_transform_edt(mask)
    ridge = mask & (edt >= ndi.maximum_filter(edt, size=3))
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
    outside = ndi.distance_transform_edt(~mask)
    return np.maximum(soft, np.clip(radius + 1.0 - outside, 0.0, 1.0)).astype(np.float32)


def _normalise(soft: np.ndarray, mask: np.ndarray) -> torch.Tensor:
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
    cy, cx = ndi.center_of_mass(small)
    y0 = int(np.clip(round(CENTRE - cy), 0, FIELD - new_h))
    x0 = int(np.clip(round(CENTRE - cx), 0, FIELD - new_w))
    field = np.zeros((FIELD, FIELD), np.float32)
    field[y0 : y0 + new_h, x0 : x0 + new_w] = small
    return torch.from_numpy(field)[None]


def preprocess(image: Image.Image | np.ndarray, invert: str = "auto") -> torch.Tensor:
    """MNIST-style float32 ``[1, 28, 28]`` in [0, 1], ink = 1, from a PIL image or a numpy array.

    ``invert``: ``"auto"`` detects dark-on-light and inverts it, ``"yes"`` always
    inverts, ``"no"`` never. Arrays may be 2-D grey, HxWx1/3/4, of bool, integer
    (full range of the dtype; wide ints holding ≤ 255 read as 8-bit) or float
    (``[0, 1]``, or ``0..255`` when the maximum exceeds 1) type. Raises
    :class:`ImageError` ("no ink found …") for a blank image.
    """
    soft, mask = _ink(image, invert)
    return _normalise(soft, mask)


# --------------------------------------------------------------------------- several digits


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

    Uses the same ink detection as :func:`preprocess`, then :func:`_digit_boxes`.
    Raises :class:`ImageError` when there is no ink.
    """
    soft, mask = _ink(image, invert)
    tensors = []
    for part in _digit_boxes(mask):
        near = ndi.binary_dilation(part, structure=np.ones((3, 3), bool))
        tensors.append(_normalise(np.where(near, soft, 0.0).astype(np.float32), part))
    return tensors
