"""Decoding a user's image file and turning its pixels into float greyscale, with bounded time and memory.

:func:`open_image` decodes a path or bytes (EXIF orientation applied, size checked
from the header before decoding); :func:`to_grey` turns a PIL image or a numpy
array into float32 greyscale in [0, 1], transparency composited, reduced to at
most :data:`WORK_SIZE` pixels on the longer side. Both are the first steps of
:func:`mnistrec.preprocess.preprocess`.
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

from .errors import ImageError, first_line

#: Largest image (width × height) we decode; bigger files are refused as possible decompression bombs.
MAX_PIXELS = 50_000_000
#: Images are reduced to at most this many pixels on their longer side before any float work (bounded memory).
WORK_SIZE = 1024


# --------------------------------------------------------------------------- decoding


def open_image(source: str | os.PathLike | bytes, max_pixels: int = MAX_PIXELS, draft: bool = False) -> Image.Image:
    """Decode an image file (path or bytes), apply its EXIF orientation and check its size.

    Reads PNG, JPEG, BMP, GIF (first frame), WebP and TIFF in any mode Pillow
    supports (greyscale, RGB, RGBA, palette, 16-bit). Raises :class:`ImageError`
    with a one-line message for a missing or unreadable path, a file that is not
    an image, a truncated or corrupt file, a 0×0 image, or more than
    ``max_pixels`` pixels (checked from the header, before decoding, so a
    decompression bomb never allocates its memory).

    ``draft=True`` lets the JPEG decoder skip detail that :func:`~mnistrec.preprocess.preprocess`
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


def to_grey(image: Image.Image | np.ndarray) -> np.ndarray:
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
