"""The IDX data layer on real files: good ones (gzip and raw), every kind of bad one, the cache."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from mnistrec import data as data_module
from mnistrec.data import FILES, load_mnist, load_split, parse_idx, read_idx_file, to_float
from mnistrec.errors import DataError

TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"


def idx_labels(values: list[int] | bytes, count: int | None = None) -> bytes:
    payload = bytes(values)
    return struct.pack(">II", 0x801, len(payload) if count is None else count) + payload


def idx_images(count: int, rows: int = 28, cols: int = 28, payload: bytes | None = None) -> bytes:
    body = bytes(count * rows * cols) if payload is None else payload
    return struct.pack(">IIII", 0x803, count, rows, cols) + body


def unpacked(data_dir: Path, name: str) -> bytes:
    return gzip.decompress((data_dir / f"{name}.gz").read_bytes())


@pytest.fixture()
def test_split_dir(tmp_path, data_dir) -> Path:
    """A data directory with the real test split as raw (unzipped) files, ready to be damaged."""
    target = tmp_path / "mnist"
    target.mkdir()
    for name in (TEST_IMAGES, TEST_LABELS):
        (target / name).write_bytes(unpacked(data_dir, name))
    return target


# --------------------------------------------------------------------------- good files


def test_real_gzip_and_raw_files_parse_to_the_same_tensors(data_dir, test_split_dir, tmp_path):
    images = read_idx_file(data_dir / f"{TEST_IMAGES}.gz")
    labels = read_idx_file(data_dir / f"{TEST_LABELS}.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
    np.testing.assert_array_equal(read_idx_file(test_split_dir / TEST_IMAGES), images)

    gz_x, gz_y = load_split("test", data_dir, cache_dir="")
    raw_x, raw_y = load_split("test", test_split_dir, cache_dir="")
    assert gz_x.dtype == torch.uint8 and gz_y.dtype == torch.int64
    assert torch.equal(gz_x, raw_x) and torch.equal(gz_y, raw_y)
    # The first test digit of MNIST is a 7, the second a 2.
    assert gz_y[:3].tolist() == [7, 2, 1]
    assert int(gz_x.max()) == 255 and int(gz_x.min()) == 0


def test_load_mnist_full_sizes_and_limits(mnist, data_dir):
    assert mnist.train_images.shape == (60000, 28, 28) and mnist.test_images.shape == (10000, 28, 28)
    assert len(mnist.train_labels) == 60000 and len(mnist.test_labels) == 10000
    small = load_mnist(data_dir, limit_train=100, limit_test=20)
    assert small.train_images.shape == (100, 28, 28) and small.test_labels.shape == (20,)
    assert torch.equal(small.train_images, mnist.train_images[:100])
    assert small.checksums() == {name: f.sha256 for name, f in FILES.items()}


def test_to_float_scales_to_unit_range_with_a_channel_axis(mnist):
    x = to_float(mnist.test_images[:5])
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0


def test_data_dir_resolution_order(monkeypatch, tmp_path):
    monkeypatch.setenv("MNIST_DATA_DIR", str(tmp_path / "env"))
    assert data_module.resolve_data_dir(tmp_path / "flag") == tmp_path / "flag"
    assert data_module.resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("MNIST_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_module.resolve_data_dir(None) == tmp_path / "xdg" / "mnistrec" / "mnist"


# --------------------------------------------------------------------------- bad bytes


@pytest.mark.parametrize(
    "raw, message",
    [
        (struct.pack(">II", 0x804, 3) + bytes(3), "bad magic number 0x00000804"),
        (b"\x00\x00\x08", "truncated IDX header (3 bytes)"),
        (struct.pack(">II", 0x803, 2) + bytes(4), "truncated IDX image header"),
        (idx_labels([1, 2, 3], count=5), "truncated: header says (5,) = 5 bytes, payload is 3"),
        (idx_images(2)[:-10], "truncated: header says (2, 28, 28)"),
        (idx_labels([1, 2, 3], count=2), "has trailing bytes"),
        (idx_images(1) + b"\x00", "has trailing bytes"),
    ],
    ids=["wrong-magic", "short-header", "short-image-header", "short-labels", "short-images", "trailing-labels", "trailing-images"],
)
def test_parse_idx_rejects_malformed_bytes(raw, message):
    with pytest.raises(DataError) as info:
        parse_idx(raw, "some/file")
    assert str(info.value).startswith("some/file: ")
    assert message in str(info.value)


def test_parse_idx_accepts_well_formed_synthetic_files():
    assert parse_idx(idx_labels([3, 1, 4])).tolist() == [3, 1, 4]
    images = parse_idx(idx_images(2, 3, 4, payload=bytes(range(24))))
    assert images.shape == (2, 3, 4) and images[1, 2, 3] == 23


def _damage(directory: Path, name: str, content: bytes) -> Path:
    path = directory / name
    path.write_bytes(content)
    return path


# Each case rewrites one file of the real test split; the error must name that file and say what is wrong.
BAD_FILES = {
    "wrong-magic": (TEST_LABELS, lambda raw: struct.pack(">I", 0x803) + raw[4:], "bad magic number"),
    "truncated-header": (TEST_IMAGES, lambda raw: raw[:12], "truncated IDX image header"),
    "truncated-payload": (TEST_IMAGES, lambda raw: raw[:-784], "truncated"),
    "trailing-bytes": (TEST_LABELS, lambda raw: raw + b"\x01\x02", "has trailing bytes"),
    "count-mismatch": (TEST_LABELS, lambda raw: struct.pack(">II", 0x801, 9999) + raw[8:-1], "9999 labels, but"),
    "label-out-of-range": (TEST_LABELS, lambda raw: raw[:8] + b"\x0c" + raw[9:], "label 12 is outside 0-9"),
    # Still valid IDX with plausible labels, so only the checksum can tell: a 7 became a 1.
    "checksum-mismatch": (TEST_LABELS, lambda raw: raw[:8] + b"\x01" + raw[9:], "checksum mismatch"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_load_split_names_the_bad_file_and_the_problem(case, test_split_dir):
    name, damage, message = BAD_FILES[case]
    path = _damage(test_split_dir, name, damage((test_split_dir / name).read_bytes()))
    with pytest.raises(DataError) as info:
        load_split("test", test_split_dir, cache_dir="")
    text = str(info.value)
    assert str(path) in text and message in text and "\n" not in text


def test_flipped_byte_in_image_payload_fails_the_checksum(test_split_dir):
    path = test_split_dir / TEST_IMAGES
    raw = bytearray(path.read_bytes())
    raw[5000] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="checksum mismatch"):
        load_split("test", test_split_dir, cache_dir="")
    # Verification can be turned off (other IDX data); the structure is still checked.
    images, _ = load_split("test", test_split_dir, cache_dir="", verify=False)
    assert images.reshape(-1)[5000 - 16] == raw[5000]


@pytest.mark.parametrize(
    "content, message",
    [(b"this is not gzip at all", "not a valid gzip file"), (None, "not a valid gzip file")],
    ids=["garbage", "truncated-gzip"],
)
def test_bad_gzip_is_reported(content, message, test_split_dir, data_dir):
    (test_split_dir / TEST_LABELS).unlink()
    if content is None:  # the first half of the real compressed file
        real = (data_dir / f"{TEST_LABELS}.gz").read_bytes()
        content = real[: len(real) // 2]
    path = _damage(test_split_dir, f"{TEST_LABELS}.gz", content)
    with pytest.raises(DataError) as info:
        load_split("test", test_split_dir, cache_dir="")
    assert str(path) in str(info.value) and message in str(info.value)


def test_missing_directory_and_missing_file(tmp_path, test_split_dir):
    with pytest.raises(DataError, match="does not exist: run `mnistrec download"):
        load_split("test", tmp_path / "nowhere")
    (test_split_dir / TEST_LABELS).unlink()
    with pytest.raises(DataError, match=f"{TEST_LABELS}\\(.gz\\) not found in {test_split_dir}"):
        load_split("test", test_split_dir)
    with pytest.raises(DataError, match="unknown split"):
        load_split("validation", test_split_dir)


# --------------------------------------------------------------------------- decoded cache


def test_second_load_is_served_from_the_cache(test_split_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load_split("test", test_split_dir, cache_dir=cache)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and all(f.endswith(".npy") for f in files)

    def no_parsing(*args, **kwargs):
        raise AssertionError("the IDX files were parsed again instead of read from the cache")

    monkeypatch.setattr(data_module, "parse_idx", no_parsing)
    second = load_split("test", test_split_dir, cache_dir=cache)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_damaged_cache_is_rebuilt(test_split_dir, tmp_path):
    cache = tmp_path / "cache"
    reference = load_split("test", test_split_dir, cache_dir=cache)
    images_npy, labels_npy = sorted(cache.glob("*-images.npy")), sorted(cache.glob("*-labels.npy"))
    images_npy[0].write_bytes(images_npy[0].read_bytes()[:1000])  # truncated
    labels_npy[0].write_bytes(b"")  # empty
    again = load_split("test", test_split_dir, cache_dir=cache)
    assert torch.equal(reference[0], again[0]) and torch.equal(reference[1], again[1])
    # ...and the rebuilt cache is whole again.
    assert np.load(images_npy[0]).shape == (10000, 28, 28)
    assert np.load(labels_npy[0]).shape == (10000,)


def test_changed_source_file_invalidates_the_cache(test_split_dir, tmp_path):
    cache = tmp_path / "cache"
    load_split("test", test_split_dir, cache_dir=cache)
    path = test_split_dir / TEST_LABELS
    raw = path.read_bytes()
    path.write_bytes(raw[:8] + b"\x0c" + raw[9:])  # same size, new mtime, label 12
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10_000_000))
    with pytest.raises(DataError, match="label 12"):
        load_split("test", test_split_dir, cache_dir=cache)


# --------------------------------------------------------------------------- the CLI's one line


@pytest.fixture()
def full_dir_with_bad_test_labels(tmp_path, data_dir) -> Path:
    """Real training files (links) and a test-label file with one flipped byte."""
    target = tmp_path / "mnist-bad"
    target.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", TEST_IMAGES):
        (target / f"{name}.gz").symlink_to(data_dir / f"{name}.gz")
    raw = bytearray(unpacked(data_dir, TEST_LABELS))
    raw[100] = (raw[100] + 1) % 10
    (target / TEST_LABELS).write_bytes(bytes(raw))
    return target


def _assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mnistrec: error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_cli_reports_a_corrupt_file_in_one_line(full_dir_with_bad_test_labels, tmp_path):
    bad = full_dir_with_bad_test_labels / TEST_LABELS
    result = run_cli("train", "--data-dir", full_dir_with_bad_test_labels, "--epochs", "1", "--no-plots",
                     "--save", "", "--out", tmp_path / "run", "--quiet")
    _assert_one_line_error(result, str(bad), "checksum mismatch")
    assert not (tmp_path / "run" / "model.pth").exists()


def test_cli_reports_a_truncated_file_in_one_line(full_dir_with_bad_test_labels, tmp_path):
    bad = full_dir_with_bad_test_labels / TEST_LABELS
    bad.write_bytes(bad.read_bytes()[:-500])
    result = run_cli("train", "--data-dir", full_dir_with_bad_test_labels, "--epochs", "1", "--no-plots",
                     "--save", "", "--out", tmp_path / "run", "--quiet")
    _assert_one_line_error(result, str(bad), "truncated")
