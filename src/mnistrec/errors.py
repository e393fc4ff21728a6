"""The one exception type that means "the user gave us something wrong".

Every module raises :class:`MnistrecError` (or a subclass) for bad input — corrupt
data, a bad image, a bad checkpoint, an unknown name — with a message that fits on
one line. The CLI prints that line and exits non-zero; the HTTP API turns it into
a 4xx response. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MnistrecError(Exception):
    """A user-facing error with a one-line, actionable message."""


class DataError(MnistrecError):
    """The MNIST files are missing, corrupt, truncated or do not match their checksum."""


class CheckpointError(MnistrecError):
    """A checkpoint cannot be loaded safely or does not fit the model it names."""


class ImageError(MnistrecError):
    """A user image cannot be decoded or holds no digit."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of a library's exception message (or its type name), cut to ``limit`` characters.

    Libraries that parse untrusted bytes (torch.load, Pillow, onnxruntime) raise
    long, multi-line messages; our errors quote only their first line.
    """
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]
