"""Labelled image folders as training data: ``DIR/0/*.png … DIR/9/*.png``, or a CSV of ``path,label``.

Every image goes through :func:`mnistrec.preprocess.preprocess`, exactly as
``mnistrec predict`` sees it, so a model learns from the same 28×28 tensors it
will later be asked about. A file that cannot be read is reported by name (one
line each) and skipped; a source with no usable image, a digit folder that is
not named 0-9, or a CSV label outside 0-9 is a one-line :class:`DataError`.

Preprocessing a photo takes milliseconds to tens of milliseconds, so the
results are cached the way MNIST's decoded arrays are: one ``.npy`` per image
under ``~/.cache/mnistrec/folders/<code>/<sha256 of the file's bytes>.npy``.
The key is the file's content, not its name or time stamp (renaming or
re-labelling a file costs nothing, editing it is re-read), and ``<code>`` is a
hash of the preprocessing source, so a change to preprocessing never serves a
stale tensor.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .data import MNIST
from .errors import DataError, ImageError, MnistrecError
from .imagefile import open_source
from .predict import IMAGE_EXTENSIONS

#: Most images one source may hold (bounded memory: 50,000 × 28 × 28 float32 is 157 MB).
MAX_IMAGES = 50_000
#: Largest CSV file read (bytes); a CSV line per image, so this is far above MAX_IMAGES lines.
MAX_CSV_BYTES = 20 * 1024 * 1024
#: Largest image file read (bytes): every file is read whole to hash it.
MAX_FILE_BYTES = 64 * 1024 * 1024
_CACHE_VERSION = 1


@dataclass
class LabelledImages:
    """Preprocessed images with their labels and where they came from.

    ``images`` is float32 ``[N, 1, 28, 28]`` in [0, 1] (ink = 1), the tensors
    ``predict`` would feed the model; ``labels`` int64 ``[N]``; ``paths`` and
    ``sha256`` are per image; ``skipped`` lists ``(path, reason)`` of the files
    that could not be used.
    """

    source: Path
    images: torch.Tensor
    labels: torch.Tensor
    paths: list[Path]
    sha256: list[str]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def counts(self) -> list[int]:
        """Images per digit 0-9."""
        return torch.bincount(self.labels, minlength=10).tolist()

    def digest(self) -> str:
        """One SHA-256 over every (file hash, label) pair, in order: the data set's identity."""
        h = hashlib.sha256()
        for sha, label in zip(self.sha256, self.labels.tolist()):
            h.update(f"{sha} {label}\n".encode())
        return h.hexdigest()

    def provenance(self) -> dict[str, Any]:
        """What a checkpoint records about this data: source, counts, digest and each file's hash and label."""
        return {
            "source": str(self.source),
            "count": len(self),
            "per_digit": self.counts(),
            "sha256": self.digest(),
            "files": [
                {"path": _relative(p, self.source), "sha256": s, "label": int(y)}
                for p, s, y in zip(self.paths, self.sha256, self.labels.tolist())
            ],
            "skipped": [_relative(p, self.source) for p, _ in self.skipped],
        }


def _relative(path: Path, root: Path) -> str:
    base = root if root.is_dir() else root.parent
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


@dataclass
class FolderData(MNIST):
    """:class:`~mnistrec.data.MNIST` whose training images are (or include) a labelled folder's; test stays MNIST's."""

    folder_sha256: str = ""

    def checksums(self) -> dict[str, str]:
        return {**super().checksums(), "images_folder": self.folder_sha256}


def training_data(mnist: MNIST, folder: LabelledImages, with_mnist: bool = False) -> FolderData:
    """Data for ``mnistrec train --images DIR [--with-mnist]``: the folder's images (first) and MNIST's, or the folder's alone.

    The folder's tensors are stored as ``uint8`` like MNIST's (a rounding of at
    most 1/510 per pixel), so the training code treats both the same way.
    """
    pixels = (folder.images[:, 0].clamp(0, 1) * 255).round().to(torch.uint8)
    images, labels = pixels, folder.labels
    if with_mnist:
        images, labels = torch.cat([pixels, mnist.train_images]), torch.cat([folder.labels, mnist.train_labels])
    return FolderData(images, labels, mnist.test_images, mnist.test_labels, mnist.data_dir, folder.digest())


# --------------------------------------------------------------------------- listing


def list_labelled_files(source: str | os.PathLike) -> list[tuple[Path, int]]:
    """``(path, digit)`` for every image of a digit-folder tree or a ``path,label`` CSV, sorted by digit then path.

    In a folder, only sub-folders named ``0`` … ``9`` are read (recursively,
    image file name endings only, as ``predict`` does with folders); any other
    sub-folder name is an error, except hidden ones (``.git``, ``.ipynb_checkpoints``).
    """
    source = Path(source)
    if source.is_file():
        return _list_csv(source)
    if not source.is_dir():
        raise DataError(f"{source}: no such folder or CSV file")
    found: list[tuple[Path, int]] = []
    for child in sorted(source.iterdir()):
        if child.name.startswith(".") or not child.is_dir():
            continue
        if child.name not in {str(d) for d in range(10)}:
            raise DataError(f"{child}: sub-folders must be named by their digit, 0 to 9 (found {child.name!r})")
        digit = int(child.name)
        files = sorted(p for p in child.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        found.extend((p, digit) for p in files)
        if len(found) > MAX_IMAGES:
            raise DataError(f"{source}: more than {MAX_IMAGES:,} images; use a smaller folder")
    if not found:
        raise DataError(f"{source}: no images found; expected sub-folders 0 to 9 holding image files "
                        "(PNG, JPEG, BMP, GIF, WebP, TIFF), or a CSV file of path,label")
    return found


def _list_csv(path: Path) -> list[tuple[Path, int]]:
    """Rows ``path,label`` (an optional header row is skipped); relative paths are relative to the CSV's folder."""
    try:
        if path.stat().st_size > MAX_CSV_BYTES:
            raise DataError(f"{path}: CSV larger than {MAX_CSV_BYTES // (1024 * 1024)} MiB")
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file; expected a CSV of path,label") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    found: list[tuple[Path, int]] = []
    for number, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != 2:
            raise DataError(f"{path}, line {number}: expected 2 columns path,label, found {len(row)}")
        name, label = row[0].strip(), row[1].strip()
        if number == 1 and not label.lstrip("-").isdigit():
            continue  # a header row such as "path,label"
        if label not in {str(d) for d in range(10)}:
            raise DataError(f"{path}, line {number}: label {label!r} is not a digit 0 to 9")
        file = Path(name)
        found.append((file if file.is_absolute() else path.parent / file, int(label)))
        if len(found) > MAX_IMAGES:
            raise DataError(f"{path}: more than {MAX_IMAGES:,} images; use a smaller list")
    if not found:
        raise DataError(f"{path}: no rows; expected a CSV of path,label")
    return found


# --------------------------------------------------------------------------- loading with a cache


def preprocessing_code_hash() -> str:
    """A short hash of the preprocessing source: part of every cache key, so new code never reads old tensors.

    It covers ``preprocess.py`` and every module of this package it imports,
    directly or not (found by reading their ``from .x import`` lines), so
    preprocessing can be split over modules without the cache going stale.
    """
    package = Path(__file__).parent
    seen: set[Path] = set()
    todo = [package / "preprocess.py"]
    h = hashlib.sha256(f"{_CACHE_VERSION}".encode())
    while todo:
        file = todo.pop()
        if file in seen or not file.is_file():
            continue
        seen.add(file)
        source = file.read_bytes()
        h.update(file.name.encode() + b"\0" + source)
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [alias.name for alias in node.names]
                todo.extend(package / f"{name.split('.')[0]}.py" for name in names)
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    from .data import default_cache_dir as root

    return root() / "folders"


def _preprocess_bytes(raw: bytes, invert: str) -> torch.Tensor:
    from .preprocess import open_image, preprocess

    return preprocess(open_image(raw, draft=True), invert)


def load_labelled_images(
    source: str | os.PathLike,
    invert: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    on_skip: Callable[[Path, str], None] | None = None,
    on_done: Callable[[int], None] | None = None,
) -> LabelledImages:
    """Read and preprocess every image of ``source`` (a digit-folder tree or a CSV); see the module docstring.

    ``on_skip(path, reason)`` is called for each file that cannot be used
    (default: nothing; the list is also in ``skipped``); ``on_done(1)`` after
    each file, for a progress bar. ``cache_dir=""`` disables the cache.
    Raises :class:`DataError` when no image is usable.
    """
    source = Path(source)
    listing = list_labelled_files(source)
    cache = None if cache_dir == "" else Path(cache_dir or default_cache_dir()) / f"{invert}-{preprocessing_code_hash()}"
    tensors: list[torch.Tensor] = []
    labels, paths, hashes, skipped = [], [], [], []
    for path, label in listing:
        try:
            raw = _read_file(path)
            sha = hashlib.sha256(raw).hexdigest()
            tensor = _cached(cache, sha) if cache else None
            if tensor is None:
                tensor = _preprocess_bytes(raw, invert)
                if cache:
                    _store(cache, sha, tensor)
        except ImageError as exc:
            skipped.append((path, str(exc)))
            if on_skip:
                on_skip(path, str(exc))
        except MemoryError:
            skipped.append((path, "image too large to process in the available memory"))
            if on_skip:
                on_skip(path, skipped[-1][1])
        else:
            tensors.append(tensor)
            labels.append(label)
            paths.append(path)
            hashes.append(sha)
        if on_done:
            on_done(1)
    if not tensors:
        raise DataError(f"{source}: none of its {len(listing)} image(s) could be read")
    return LabelledImages(source, torch.stack(tensors), torch.tensor(labels, dtype=torch.int64), paths, hashes, skipped)


def _read_file(path: Path) -> bytes:
    """The file's bytes, refused past ``MAX_FILE_BYTES``; missing or unreadable files as ``open_image`` reports them."""
    with open_source(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > MAX_FILE_BYTES:
            raise ImageError(f"file is {size:,} bytes, more than the {MAX_FILE_BYTES:,} allowed")
        return fh.read()


def _cached(cache: Path, sha: str) -> torch.Tensor | None:
    target = cache / f"{sha}.npy"
    if not target.is_file():
        return None
    try:
        array = np.load(target, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None  # a damaged entry is recomputed, never trusted
    if array.dtype != np.float32 or array.shape != (1, 28, 28) or not np.isfinite(array).all():
        return None
    return torch.from_numpy(array)


def _store(cache: Path, sha: str, tensor: torch.Tensor) -> None:
    from .fileio import atomic_write

    try:
        atomic_write(cache / f"{sha}.npy", lambda fh: np.save(fh, tensor.numpy(), allow_pickle=False))
    except MnistrecError:
        pass  # the cache is an optimisation; a read-only or full home must not stop training
