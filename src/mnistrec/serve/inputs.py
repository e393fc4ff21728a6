"""Turning request bodies into model input: image files, base64 strings and pixel arrays.

Images go through :func:`mnistrec.preprocess.preprocess`, the one function the
CLI, the API and the web app share. Pixel arrays are taken as the model's own
input (float in [0, 1], ink = 1) and are not preprocessed.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from ..errors import MnistrecError
from ..preprocess import open_image, preprocess


class InputError(MnistrecError):
    """The request is well-formed HTTP but its content cannot be used (HTTP 422)."""


_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)


def decode_base64(text: str, what: str = "image") -> bytes:
    """Decode standard base64 (a ``data:...;base64,`` prefix and whitespace are allowed)."""
    text = _DATA_URL.sub("", text.strip(), count=1)
    text = "".join(text.split())
    if not text:
        raise InputError(f"{what} is empty")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{what} is not valid base64") from None


def image_to_tensor(data: bytes, max_pixels: int, invert: str = "auto") -> torch.Tensor:
    """Decode an image file and preprocess it as MNIST was made: float ``[1, 28, 28]`` in [0, 1].

    Only the formats of :data:`mnistrec.imagefile.ACCEPTED_FORMATS` are decoded; more
    than ``max_pixels`` pixels (or 4 bytes per allowed pixel once decoded) is refused
    from the header. ``draft`` decoding keeps memory and time proportional to the
    1024-px working size, not to the upload.
    """
    if not data:
        raise InputError("the image file is empty")
    return preprocess(open_image(data, max_pixels=max_pixels, draft=True), invert=invert)


#: A PNG up to this many pixels (the page's 140x140 canvas is 19,600) is preprocessed on the event loop: ~1 ms of
#: work, less than the hop to a worker thread and back costs in latency (~0.3 ms measured per request).
INLINE_PNG_PIXELS = 256 * 256
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_small_png(data: bytes) -> bool:
    """Whether ``data`` is a PNG whose header declares at most :data:`INLINE_PNG_PIXELS` pixels.

    Only a routing decision: the decoder reads the same IHDR chunk, so the picture it
    decodes is no larger, and :func:`image_to_tensor` still checks every limit.
    """
    if len(data) < 24 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return False
    width, height = struct.unpack(">II", data[16:24])
    return width * height <= INLINE_PNG_PIXELS


def pixels_to_tensor(values: Any, scale: float = 1.0, what: str = "pixels") -> torch.Tensor:
    """A nested list (or flat list) of numbers as a float32 array, checked to be finite and in [0, 1] after ``/scale``."""
    try:
        array = np.asarray(values, dtype=np.float32)
    except (ValueError, TypeError, OverflowError):
        raise InputError(f"{what} must be a rectangular array of numbers") from None
    if scale != 1.0:
        array = array / np.float32(scale)
    if array.size and not (np.isfinite(array).all() and array.min() >= 0.0 and array.max() <= 1.0):
        limit = "0 and 255" if scale == 255.0 else "0 and 1"
        raise InputError(f"{what} must be finite numbers between {limit} (ink = {'255' if scale == 255.0 else '1'})")
    return torch.from_numpy(np.ascontiguousarray(array))


def as_images(x: torch.Tensor, what: str = "pixels") -> torch.Tensor:
    """Reshape ``[28,28]``, ``[N,28,28]``, ``[N,784]`` or ``[N,1,28,28]`` to ``[N,1,28,28]``."""
    shape = tuple(x.shape)
    if shape == (28, 28):
        return x.reshape(1, 1, 28, 28)
    if len(shape) == 2 and shape[1] == 784 or len(shape) == 3 and shape[1:] == (28, 28) or len(shape) == 4 and shape[1:] == (1, 28, 28):
        return x.reshape(shape[0], 1, 28, 28)
    raise InputError(f"{what} has shape {list(shape)}; expected [28, 28], [N, 28, 28], [N, 784] or [N, 1, 28, 28]")


def validation_message(exc: ValidationError | Any) -> str:
    """One line from pydantic/FastAPI validation errors: ``where: what`` for the first three."""
    errors = exc.errors() if hasattr(exc, "errors") else list(exc)
    parts = []
    for error in errors[:3]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "__root__")
        parts.append(f"{where}: {error.get('msg', 'invalid')}" if where else str(error.get("msg", "invalid")))
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more if parts else "invalid request"
