"""Crash-safe file writes: every file mnistrec writes goes through :func:`atomic_write`.

Used by checkpoints, run directories, the data cache, plots and exports. A full
disk, a read-only directory or a crash leaves the previous file intact and no
half-written file under the real name.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import IO, Callable

from .errors import MnistrecError


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write(fileobj)``, then put the bytes at ``path`` atomically: temporary file, fsync, rename.

    The previous file at ``path`` stays intact (byte for byte) until the new one is
    complete; a full disk, a read-only directory or a crash leaves no partial file.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    # Serialise to memory first: torch.save reports a failing file write as an opaque
    # RuntimeError ("unexpected pos ..."), so the disk is only touched by our own
    # write() below, whose OSError (ENOSPC, EFBIG, EROFS, EACCES) we turn into one line.
    buffer = io.BytesIO()
    tmp = None
    try:
        write(buffer)
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
        # mkstemp creates 0600; give the file the mode a plain open() would (0666 minus the umask).
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(buffer.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise MnistrecError(f"cannot write {path}: {exc.strerror or exc}; any previous file there is unchanged") from None
        raise
    _fsync_directory(directory)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_write`."""
    data = text.encode()
    atomic_write(path, lambda fh: fh.write(data))


def _fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (best effort: not every file system allows it)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
