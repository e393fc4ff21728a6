"""The IDX file format of MNIST: parsing with one-line errors, and the SHA-256 of the four known files.

No torchvision: the format is a magic number, a count, the image size and the raw bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

IMAGE_MAGIC = 0x00000803
LABEL_MAGIC = 0x00000801


@dataclass(frozen=True)
class IdxFile:
    """One of the four MNIST files: its name and what its unpacked bytes must be."""

    name: str  # base name without .gz
    sha256: str  # of the decompressed bytes
    size: int  # decompressed size in bytes


FILES: dict[str, IdxFile] = {
    f.name: f
    for f in (
        IdxFile("train-images-idx3-ubyte", "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db", 47_040_016),
        IdxFile("train-labels-idx1-ubyte", "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5", 60_008),
        IdxFile("t10k-images-idx3-ubyte", "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7", 7_840_016),
        IdxFile("t10k-labels-idx1-ubyte", "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2", 10_008),
    )
}


def read_bytes(path: Path, source: str | None = None) -> bytes:
    """The file's bytes, unzipped when its name ends in ``.gz``; errors name ``source`` (default: the path).

    For the four MNIST files at most their known size + 1 byte is read (``read(n)``
    inflates no more than n bytes), so a gzip bomb under an MNIST name costs no
    more memory than MNIST itself; parse_idx then names it as having trailing bytes.
    """
    known = FILES.get(path.name.removesuffix(".gz"))
    limit = known.size + 1 if known is not None else -1
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read(limit)
        with open(path, "rb") as fh:
            return fh.read(limit)
    except (OSError, EOFError, zlib.error) as exc:
        # BadGzipFile is an OSError; a truncated gzip stream raises EOFError, damaged deflate data zlib.error.
        what = "not a valid gzip file" if path.suffix == ".gz" and not isinstance(exc, FileNotFoundError) else "cannot read"
        raise DataError(f"{source or path}: {what} ({exc})") from None


def expected_magic(name: str) -> int | None:
    """The magic number a file must have, judged by its MNIST name (``None`` if unknown)."""
    if "-images-" in name:
        return IMAGE_MAGIC
    if "-labels-" in name:
        return LABEL_MAGIC
    return None


def parse_idx(raw: bytes, source: str = "<bytes>", expect: int | None = None) -> np.ndarray:
    """Parse IDX bytes into a ``uint8`` array of shape ``[N]`` or ``[N, rows, cols]``.

    Raises :class:`DataError` for a wrong magic number (or not the ``expect``-ed
    one), a short header, or a count that disagrees with the payload length.
    """
    if len(raw) < 8:
        raise DataError(f"{source}: truncated IDX header ({len(raw)} bytes)")
    magic, count = struct.unpack(">II", raw[:8])
    if expect is not None and magic != expect:
        kind = "an image" if expect == IMAGE_MAGIC else "a label"
        raise DataError(f"{source}: bad magic number 0x{magic:08x} (expected 0x{expect:08x} for {kind} file)")
    if magic == LABEL_MAGIC:
        header, shape = 8, (count,)
    elif magic == IMAGE_MAGIC:
        if len(raw) < 16:
            raise DataError(f"{source}: truncated IDX image header ({len(raw)} bytes)")
        rows, cols = struct.unpack(">II", raw[8:16])
        header, shape = 16, (count, rows, cols)
    else:
        raise DataError(
            f"{source}: bad magic number 0x{magic:08x} (expected 0x{IMAGE_MAGIC:08x} for images "
            f"or 0x{LABEL_MAGIC:08x} for labels)"
        )
    expected = math.prod(shape)  # Python ints: a garbage header must not overflow
    payload = len(raw) - header
    if payload != expected:
        kind = "truncated" if payload < expected else "has trailing bytes"
        raise DataError(f"{source}: {kind}: header says {shape} = {expected} bytes, payload is {payload}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_idx_file(path: str | os.PathLike, verify: bool = True) -> np.ndarray:
    """Read one IDX file (gzip or raw); verify its SHA-256 when it is a known MNIST file.

    The structure is checked first, so a truncated or mislabelled file is named as
    such; the checksum then catches any damage the structure cannot show.
    """
    path = Path(path)
    raw = read_bytes(path)
    array = parse_idx(raw, str(path), expected_magic(path.name))
    known = FILES.get(path.name.removesuffix(".gz"))
    if verify and known is not None:
        check_sha256(raw, known, str(path))
    return array


def check_sha256(raw: bytes, known: IdxFile, source: str) -> None:
    """Raise :class:`DataError` unless ``raw`` has the SHA-256 of the known MNIST file."""
    digest = hashlib.sha256(raw).hexdigest()
    if digest != known.sha256:
        raise DataError(
            f"{source}: checksum mismatch (sha256 of the unpacked bytes is {digest[:16]}…, "
            f"expected {known.sha256[:16]}…); the file is corrupt or not MNIST: delete it and download again"
        )
