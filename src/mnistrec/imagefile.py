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

#: The formats the README promises, in Pillow's names, and the only decoders ever run (never EPS, which runs
#: Ghostscript, nor PSD, FLI, SGI and Pillow's other decoders of rarely used formats).
ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
ACCEPTED_NAMES = "PNG, JPEG, BMP, GIF, WebP or TIFF"
#: Largest image (width × height) we decode by default (the CLI); bigger files are refused as possible decompression
#: bombs. The HTTP API uses a smaller cap (mnistrec.serve: 4096 × 4096).
MAX_PIXELS = 50_000_000
#: Images are reduced to at most this many pixels on their longer side before any float work (bounded memory).
WORK_SIZE = 1024
#: JPEG draft decoding (DCT scaling) keeps at least this many pixels on the longer side.
DRAFT_SIZE = 3 * WORK_SIZE // 4
#: Bytes per pixel of Pillow's in-memory modes: 1, L and P take one byte, 16-bit greyscale two, the rest
#: (RGB included) four.
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}


# --------------------------------------------------------------------------- decoding


def decoded_bytes(image: Image.Image) -> int:
    """Memory Pillow allocates to decode ``image`` (from its header: mode, size, and the draft scale if set)."""
    return image.width * image.height * _MODE_BYTES.get(image.mode, 4)


def open_source(source: str | os.PathLike | bytes) -> io.BufferedIOBase:
    """A binary file object for a path or bytes; :class:`ImageError` for an empty, missing or unreadable one."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError("empty file, not an image")
        return io.BytesIO(bytes(source))
    try:
        return open(Path(source), "rb")  # noqa: SIM115 - closed by the caller's with-block
    except FileNotFoundError:
        raise ImageError("no such file") from None
    except IsADirectoryError:
        raise ImageError("is a directory, not an image") from None
    except OSError as exc:
        raise ImageError(f"cannot read: {exc.strerror or exc}") from None


def _check_header(image: Image.Image, max_pixels: int, max_bytes: int) -> None:
    """Refuse empty images, more than ``max_pixels`` pixels, or more than ``max_bytes`` once decoded."""
    width, height = image.size
    if width == 0 or height == 0:
        raise ImageError(f"image is {width}×{height} pixels, nothing to read")
    if width * height > max_pixels:
        raise ImageError(f"image is {width}×{height} = {width * height:,} pixels, more than the "
                         f"{max_pixels:,} allowed (decompression bomb?)")
    if decoded_bytes(image) > max_bytes:
        raise ImageError(f"image is {width}×{height} in mode {image.mode}: {decoded_bytes(image) / 2**20:,.0f} MiB "
                         f"decoded, more than the {max_bytes / 2**20:,.0f} MiB allowed")


def _shrink_for_work(image: Image.Image) -> Image.Image:
    """Box-reduce by the largest integer factor that keeps the longer side >= WORK_SIZE, in the image's own mode.

    Done before any conversion, so a 4096×4096 RGBA picture is converted at 1024×1024
    (4 MiB), not at full size (64 MiB per copy). Palette, 1-bit and 16-bit modes
    cannot be averaged as they are (an average of palette indices is meaningless)
    and are converted first.
    """
    factor = max(image.size) // WORK_SIZE
    if factor < 2:
        return image
    info = dict(image.info)
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
    elif image.mode == "1":
        image = image.convert("L")
    elif image.mode.startswith("I;16"):
        # Reduced as 32-bit integers, then scaled to [0, 1] as 16-bit pictures are (to_grey reads "F" as is).
        wide = np.asarray(image.convert("I").reduce(factor), dtype=np.float32) / np.float32(65535.0)
        small = Image.fromarray(wide, mode="F")
        small.info = info
        return small
    if image.mode in ("RGBA", "LA", "RGBa", "La"):
        # Pillow's own reduce premultiplies alpha on a full-size copy (64 MiB for 4096² RGBA): reduce the grey and
        # alpha planes (1 byte per pixel) instead; to_grey composites them, un-premultiplied, as it always has.
        small = Image.merge("LA", (image.convert("L").reduce(factor), image.getchannel("A").reduce(factor)))
    else:
        small = image.reduce(factor)
    small.info = info  # keeps the EXIF orientation for exif_transpose
    return small


def open_image(source: str | os.PathLike | bytes, max_pixels: int = MAX_PIXELS, draft: bool = False,
               max_bytes: int | None = None) -> Image.Image:
    """Decode an image file (path or bytes), apply its EXIF orientation and check its size.

    Reads PNG, JPEG, BMP, GIF (first frame), WebP and TIFF (:data:`ACCEPTED_FORMATS`)
    in any mode Pillow supports (greyscale, RGB, RGBA, palette, 16-bit); no other
    decoder is ever run. Raises :class:`ImageError` with a one-line message for a
    missing or unreadable path, a file that is not an image in an accepted format,
    a truncated or corrupt file, a 0×0 image, more than ``max_pixels`` pixels, or
    more than ``max_bytes`` of decoded pixels (default: 4 bytes per allowed
    pixel). Both caps are checked from the header, before decoding, so a
    decompression bomb never allocates its memory.

    ``draft=True`` (the CLI and the API) drops detail that
    :func:`~mnistrec.preprocess.preprocess` would average away anyway: the JPEG
    decoder works at 1/2, 1/4 or 1/8 scale, never below DRAFT_SIZE (3/4 of
    WORK_SIZE) on the longer side, and decodes only the luma of a colour JPEG
    (a 12-Mpx phone photo decodes several times faster); any picture
    at least twice WORK_SIZE is box-reduced by an integer factor right after
    decoding, before its EXIF rotation and conversions.
    """
    max_bytes = 4 * max_pixels if max_bytes is None else max_bytes
    with open_source(source) as fh:
        try:
            with warnings.catch_warnings():
                # Pillow only *warns* between MAX_IMAGE_PIXELS and twice that; we enforce our own cap below.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(fh, formats=ACCEPTED_FORMATS)
                _check_header(image, max_pixels, 2**62)
                if draft and image.format in ("JPEG", "MPO"):  # MPO: a phone's JPEG with extra pictures
                    # Pillow keeps both sides >= the requested ones: ask for 3/4 of the working size (a 4032-px
                    # photo decodes at 1/4 scale, 1008 px, not at 1/2), and for the luma plane alone (the JPEG's
                    # own Y, the same weights as convert("L")): no colour conversion, a quarter of the bytes.
                    factor = DRAFT_SIZE / max(image.size)
                    image.draft("L" if image.mode == "RGB" else image.mode,
                                (max(1, int(image.width * factor)), max(1, int(image.height * factor))))
                _check_header(image, max_pixels, max_bytes)  # after draft: the size actually decoded
                image.load()
        except ImageError:
            raise
        except Image.DecompressionBombError:
            raise ImageError(f"image has more than the {max_pixels:,} pixels allowed (decompression bomb?)") from None
        except UnidentifiedImageError:
            raise ImageError(f"not an image in an accepted format ({ACCEPTED_NAMES})") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as exc:
            raise ImageError(f"truncated or corrupt image: {first_line(exc, 160)}") from None
    if draft:
        image = _shrink_for_work(image)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001, S110 - a malformed EXIF block must not lose the picture: keep it unrotated
        pass
    return image


# --------------------------------------------------------------------------- to float greyscale


def _pil_planes(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """The greyscale plane (mode "L", or "F" in [0, 1]) and the alpha plane (or None), at most WORK_SIZE on the longer side."""
    image = _shrink_for_work(image)
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
        if has_alpha and mode in ("RGBA", "LA") and (image.getchannel("A").getextrema() or (0,))[0] >= 253:
            has_alpha = False  # opaque (a canvas export): to_grey would ignore an alpha >= 0.99 anyway
        if has_alpha:
            la = image.convert("RGBA").convert("LA")
            image, alpha = la.getchannel("L"), la.getchannel("A")
        elif mode != "L":  # an "L" picture is used as it is (never modified in place)
            image, alpha = image.convert("L"), None
        else:
            alpha = None
    if max(image.size) > WORK_SIZE:
        factor = WORK_SIZE / max(image.size)
        size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
        # BOX = area averaging: a thin stroke becomes fainter but never disappears.
        image = image.resize(size, Image.Resampling.BOX)
        alpha = alpha.resize(size, Image.Resampling.BOX) if alpha is not None else None
    return image, alpha


def _plane_arrays(plane: Image.Image, alpha: Image.Image | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The planes of :func:`_pil_planes` as greyscale float32 in [0, 1] and alpha (or None)."""
    if plane.mode == "L":
        grey = grey_of_levels(np.asarray(plane))  # already finite and in [0, 1]
    else:
        grey = np.clip(np.nan_to_num(np.asarray(plane, dtype=np.float32)), 0.0, 1.0)
    a = np.asarray(alpha, dtype=np.float32) / 255.0 if alpha is not None else None
    return grey, a


def grey_of_levels(levels: np.ndarray) -> np.ndarray:
    """An 8-bit plane as :func:`to_grey` reads it: float32 ``levels × float32(1/255)``."""
    grey = levels.astype(np.float32)
    grey *= np.float32(1 / 255.0)
    return grey


def grey_or_levels(image: Image.Image | np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(L, None)`` when :func:`to_grey` of ``image`` is exactly ``grey_of_levels(L)``, else ``(None, to_grey(image))``.

    ``L`` (uint8) exists for a PIL picture read as 8-bit grey with nothing to
    composite (any PNG or JPEG without transparency: the web page's drawing, scans,
    photos); statistics of such a picture can be taken over its 256 levels instead
    of over every pixel. The picture is converted once either way.
    """
    if not isinstance(image, Image.Image):
        return None, to_grey(image)
    plane, alpha = _pil_planes(image)
    if plane.mode == "L" and plane.width and plane.height and (
            alpha is None or not _composited(np.asarray(alpha, dtype=np.float32) / 255.0)):
        return np.asarray(plane), None
    return None, _composite(*_plane_arrays(plane, alpha))


def _composited(alpha: np.ndarray) -> bool:
    """Whether :func:`to_grey` composites this alpha plane (any pixel under 0.99) instead of ignoring it."""
    return float(alpha.min()) < 0.99


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
        grey, alpha = _plane_arrays(*_pil_planes(image))
    elif isinstance(image, np.ndarray):
        grey, alpha = _array_to_arrays(image)
    else:
        raise ImageError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
    return _composite(grey, alpha)


def _composite(grey: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    """:func:`to_grey`'s last step: refuse an empty picture; composite a transparent one."""
    if grey.size == 0:
        raise ImageError(f"image is {grey.shape[-1] if grey.ndim == 2 else 0}×{grey.shape[0]} pixels, nothing to read")
    if alpha is not None and _composited(alpha):
        if float(alpha.max()) < 0.02:
            raise ImageError("no ink found: the image is fully transparent")
        # The strokes are the opaque part; their colour under a transparent pixel is arbitrary
        # (often black). Composite onto the colour that contrasts most with the strokes.
        ink = float((grey * alpha).sum() / max(float(alpha.sum()), 1e-6))
        background = 1.0 if ink < 0.5 else 0.0
        grey = alpha * grey + (1.0 - alpha) * background
    return grey
