"""MNIST as in-memory tensors: where the files are, loading and checking them, download, decoded cache.

No torchvision: the four IDX files are tiny and their format is four lines of
``struct`` (:mod:`mnistrec.idx`). Everything downstream works on whole tensors (``uint8 [N, 28, 28]``
images, ``int64 [N]`` labels), so training slices batches instead of calling a
per-sample ``Dataset``.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError, MnistrecError
from .idx import FILES, IMAGE_MAGIC, LABEL_MAGIC, IdxFile, check_sha256, expected_magic, parse_idx, read_bytes, read_idx_file

SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# Tried in order; the first is PyTorch's own mirror, the last the original site.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

# Bump when the cache layout changes so stale caches are ignored, never misread.
_CACHE_VERSION = 1


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mnistrec"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``--data-dir`` wins, then ``$MNIST_DATA_DIR``, then ``~/.cache/mnistrec/mnist``."""
    if data_dir:
        return Path(data_dir)
    if os.environ.get("MNIST_DATA_DIR"):
        return Path(os.environ["MNIST_DATA_DIR"])
    return default_cache_dir() / "mnist"


def _find(data_dir: Path, name: str) -> Path:
    for candidate in (data_dir / f"{name}.gz", data_dir / name):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"{name}(.gz) not found in {data_dir}: run `mnistrec download --data-dir {data_dir}` "
        "or pass --data-dir / set MNIST_DATA_DIR"
    )


def _cache_key(paths: list[Path], verify: bool) -> str:
    # An unverified load must never be served later to a caller who asked for verification.
    h = hashlib.sha256(f"{_CACHE_VERSION}|{verify}".encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def load_split(
    split: str,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    verify: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``"train"`` or ``"test"`` as ``(uint8 [N, 28, 28], int64 [N])`` tensors.

    The first load parses and verifies the IDX files, then caches the decoded
    arrays as ``.npy`` keyed on the source files' path, size and mtime; later
    loads read the cache (tens of milliseconds). Set ``cache_dir=False``-ish
    (empty string) to skip the cache.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    directory = resolve_data_dir(data_dir)
    if not directory.is_dir():
        raise DataError(
            f"data directory {directory} does not exist: run `mnistrec download --data-dir {directory}` "
            "or pass --data-dir / set MNIST_DATA_DIR"
        )
    paths = [_find(directory, name) for name in SPLITS[split]]

    cache = None
    if cache_dir != "":
        cache_root = Path(cache_dir) if cache_dir else default_cache_dir() / "decoded"
        key = _cache_key(paths, verify)
        cache = (cache_root / f"{split}-{key}-images.npy", cache_root / f"{split}-{key}-labels.npy")
        if all(c.is_file() for c in cache):
            try:
                images, labels = (np.load(c, allow_pickle=False) for c in cache)
                if (images.dtype == np.uint8 and images.shape[1:] == (28, 28) and labels.dtype == np.uint8
                        and labels.shape == images.shape[:1]):
                    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
            except (OSError, ValueError, EOFError):
                pass  # a damaged cache is rebuilt below, never trusted

    # Structure and content first, checksums last: the message then says what is wrong
    # (truncated, 9,999 labels, label 12) rather than only that the bytes differ.
    raw_images, raw_labels = read_bytes(paths[0]), read_bytes(paths[1])
    images = parse_idx(raw_images, str(paths[0]), IMAGE_MAGIC)
    labels = parse_idx(raw_labels, str(paths[1]), LABEL_MAGIC)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{paths[0]}: expected 28x28 images, got {images.shape[1]}x{images.shape[2]}")
    if len(images) != len(labels):
        raise DataError(f"{paths[1]}: {len(labels)} labels, but {paths[0].name} holds {len(images)} images")
    if labels.size and labels.max() > 9:
        raise DataError(f"{paths[1]}: label {int(labels.max())} is outside 0-9")
    if verify:
        for path, raw in zip(paths, (raw_images, raw_labels)):
            check_sha256(raw, FILES[path.name.removesuffix(".gz")], str(path))

    if cache is not None:
        _write_cache(cache, images, labels)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def _write_cache(cache: tuple[Path, Path], images: np.ndarray, labels: np.ndarray) -> None:
    from .fileio import atomic_write  # no partial file left behind on a full disk

    try:
        for target, array in zip(cache, (images, labels)):
            atomic_write(target, lambda fh, array=array: np.save(fh, array, allow_pickle=False))
    except MnistrecError:
        pass  # the cache is an optimisation; a read-only or full home must not stop training


@dataclass
class MNIST:
    """The data set as tensors: ``*_images`` are ``uint8 [N, 28, 28]``, ``*_labels`` ``int64 [N]``."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    data_dir: Path

    def checksums(self) -> dict[str, str]:
        return {name: f.sha256 for name, f in FILES.items()}


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> MNIST:
    """Load both splits; ``limit_*`` keep the first N examples (for quick runs and tests)."""
    train_x, train_y = load_split("train", data_dir)
    test_x, test_y = load_split("test", data_dir)
    if limit_train:
        train_x, train_y = train_x[:limit_train], train_y[:limit_train]
    if limit_test:
        test_x, test_y = test_x[:limit_test], test_y[:limit_test]
    return MNIST(train_x, train_y, test_x, test_y, resolve_data_dir(data_dir))


def validation_indices(count: int, val_size: int, split_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_idx, val_idx)``: the held-out validation split of ``count`` training images.

    A permutation seeded by ``split_seed`` alone (not the training seed), so every
    run, ``mnistrec calibrate`` included, holds out the same images.
    """
    order = torch.randperm(count, generator=torch.Generator().manual_seed(split_seed))
    return order[val_size:], order[:val_size]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """``uint8 [N, 28, 28]`` -> ``float32 [N, 1, 28, 28]`` in [0, 1]; models normalise inside."""
    return images.unsqueeze(1).float().div_(255.0)


# --------------------------------------------------------------------------- download


#: A gzip of N bytes is never much bigger than N (stored blocks add 5 bytes per 64 KiB);
#: a mirror sending more than this over the decompressed size is refused mid-transfer.
_GZIP_SLACK = 1 << 20


def _fetch(url: str, dest: Path, timeout: float, progress: bool, limit: int | None = None) -> None:
    """Stream ``url`` into ``dest``; stop with a :class:`DataError` after ``limit`` bytes."""
    from tqdm.auto import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "mnistrec"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as out:
        total = response.headers.get("Content-Length")
        total = int(total) if total and total.isdigit() else None
        received = 0
        with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1],
                  disable=not progress, leave=False) as bar:
            while chunk := response.read(1 << 16):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
                if limit is not None and received > limit:
                    raise DataError(f"the mirror sent more than {limit:,} bytes, far more than the file's size")
        if total is not None and received != total:
            raise DataError(f"connection closed after {received} of {total} bytes")
        out.flush()
        os.fsync(out.fileno())


def _gunzip_verified(path: Path, info: IdxFile) -> bytes:
    """Unzip a downloaded ``.gz`` while hashing it, holding at most ``info.size + 1`` bytes.

    A gzip bomb (a small file that inflates to gigabytes) is refused as soon as
    its output passes the known decompressed size, so memory stays bounded
    whatever a mirror or a proxy sends. Returns the bytes once size and SHA-256 match.
    """
    digest, out = hashlib.sha256(), bytearray()
    try:
        with gzip.open(path, "rb") as fh:
            # read(n) inflates at most n bytes, so nothing beyond the cap is ever produced.
            while chunk := fh.read(min(1 << 20, info.size + 1 - len(out))):
                out += chunk
                digest.update(chunk)
                if len(out) > info.size:
                    raise DataError(f"unpacks to more than the expected {info.size:,} bytes (a gzip bomb?)")
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"the response: not a valid gzip file ({exc})") from None
    raw = bytes(out)
    parse_idx(raw, "the response", expected_magic(info.name))
    if digest.hexdigest() != info.sha256:
        raise DataError("checksum mismatch: the mirror served different bytes")
    return raw


def _failure_reason(exc: BaseException) -> str:
    """A short reason for a failed fetch: "HTTP 404 Not Found", "timed out", the DataError text."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


def download(
    data_dir: str | os.PathLike | None = None,
    mirrors: tuple[str, ...] | list[str] = MIRRORS,
    timeout: float = 30.0,
    progress: bool = True,
    log=print,
) -> Path:
    """Download and verify the four files into ``data_dir``; return the directory.

    Each file goes to a temporary name in the target directory, is verified
    (gzip, IDX structure and SHA-256), then renamed into place, so an interrupted
    download never leaves a half-written file under the real name. A mirror that
    fails — HTTP error, short body, wrong bytes — falls through to the next one,
    and the reason is logged.
    """
    directory = resolve_data_dir(data_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create data directory {directory}: {exc.strerror or exc}") from None
    for name, info in FILES.items():
        final = directory / f"{name}.gz"
        present = [p for p in (final, directory / name) if p.is_file()]
        if present:
            try:
                read_idx_file(present[0])
                log(f"{present[0].name}: present and verified")
                continue
            except DataError as exc:
                log(f"{exc}; downloading again")
        reasons = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + f"/{name}.gz"
            # The ".gz" suffix makes read_bytes unzip it; the dot prefix hides it from ls.
            try:
                fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".part.gz")
            except OSError as exc:
                raise DataError(f"cannot write in {directory}: {exc.strerror or exc}") from None
            os.close(fd)
            tmp = Path(tmp_name)
            try:
                _fetch(url, tmp, timeout, progress, limit=info.size + _GZIP_SLACK)
                _gunzip_verified(tmp, info)
                os.replace(tmp, final)
                log(f"{final.name}: downloaded from {mirror}")
                break
            except (OSError, DataError, ValueError, http.client.HTTPException) as exc:
                reason = _failure_reason(exc)
                log(f"{name}.gz: {url} failed ({reason}); trying the next mirror")
                reasons.append(f"{url}: {reason}")
            finally:
                tmp.unlink(missing_ok=True)
        else:
            raise DataError(f"could not download {name}.gz from any mirror ({'; '.join(reasons)})")
    return directory
