"""Labelled image folders (DIR/<digit>/*.png, or a path,label CSV) read from real files, with the preprocess cache."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from mnistrec import folders
from mnistrec.errors import DataError, ImageError
from mnistrec.folders import list_labelled_files, load_labelled_images
from mnistrec.predict import load_file

sys.path.insert(0, str(REPO / "benchmarks"))
from writer_style import sample, write_folder  # noqa: E402


@pytest.fixture()
def tree(tmp_path):
    """Two pictures of every digit in DIR/<digit>/, plus one corrupt PNG and one text file in DIR/3/."""
    root = write_folder(tmp_path / "mine", per_digit=2, seed=5)
    (root / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "3" / "notes.txt").write_text("ignored: not an image name")
    return root


def test_folder_tree_reads_every_image_like_predict_and_reports_the_broken_one(tree, tmp_path):
    skipped = []
    data = load_labelled_images(tree, cache_dir=tmp_path / "cache", on_skip=lambda p, why: skipped.append((p.name, why)))
    assert len(data) == 20 and data.counts() == [2] * 10
    assert [name for name, _ in skipped] == ["broken.png"] and "not an image" in skipped[0][1]
    assert data.images.dtype == torch.float32 and tuple(data.images.shape) == (20, 1, 28, 28)
    # Exactly the tensor predict feeds the model for the same file.
    for index in (0, 7, 19):
        assert torch.equal(data.images[index], load_file(data.paths[index])[0])
        assert data.paths[index].parent.name == str(int(data.labels[index]))
    record = data.provenance()
    assert record["count"] == 20 and record["skipped"] == ["3/broken.png"]
    assert {f["path"] for f in record["files"]} >= {"0/5-0000.png", "9/5-0001.png"}
    assert len(record["sha256"]) == 64 and all(len(f["sha256"]) == 64 for f in record["files"])


def test_cache_is_keyed_by_content(tree, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load_labelled_images(tree, cache_dir=cache)
    assert len(list(cache.rglob("*.npy"))) == 20

    def refuse(raw, invert):  # only the broken file, never cached, may come here
        raise ImageError("preprocessed again")

    monkeypatch.setattr(folders, "_preprocess_bytes", refuse)
    again = load_labelled_images(tree, cache_dir=cache)
    assert torch.equal(first.images, again.images) and again.digest() == first.digest()
    assert [p.name for p, _ in again.skipped] == ["broken.png"]
    # A renamed file is still the same content: still cached.
    (tree / "4" / "5-0000.png").rename(tree / "4" / "renamed.png")
    assert len(load_labelled_images(tree, cache_dir=cache)) == 20
    # A changed file is new content: it is preprocessed (here: refused, so it is reported and skipped).
    sample(4, np.random.default_rng(99)).save(tree / "4" / "renamed.png")
    skipped = load_labelled_images(tree, cache_dir=cache).skipped
    assert [p.name for p, _ in skipped] == ["broken.png", "renamed.png"]


def test_a_damaged_cache_entry_is_recomputed(tree, tmp_path):
    cache = tmp_path / "cache"
    first = load_labelled_images(tree, cache_dir=cache)
    for entry in cache.rglob("*.npy"):
        entry.write_bytes(b"garbage")
    assert torch.equal(load_labelled_images(tree, cache_dir=cache).images, first.images)


def test_csv_of_path_and_label(tree, tmp_path):
    listing = tmp_path / "labels.csv"
    absolute = tree / "8" / "5-0001.png"
    listing.write_text(f"path,label\nmine/7/5-0000.png,7\n{absolute},8\nmine/missing.png,2\n")
    skipped = []
    data = load_labelled_images(listing, cache_dir="", on_skip=lambda p, why: skipped.append((p.name, why)))
    assert data.labels.tolist() == [7, 8] and skipped == [("missing.png", "no such file")]
    assert data.provenance()["files"][0]["path"] == "mine/7/5-0000.png"


@pytest.mark.parametrize(
    "content, message",
    [
        ("a.png,7\nb.png,12\n", "line 2: label '12' is not a digit 0 to 9"),
        ("a.png,7,extra\n", "line 1: expected 2 columns"),
        ("path,label\n", "no rows"),
    ],
)
def test_bad_csv_is_one_line_error(tmp_path, content, message):
    listing = tmp_path / "labels.csv"
    listing.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        list_labelled_files(listing)
    assert "\n" not in str(info.value)


def test_bad_folders_are_one_line_errors(tree, tmp_path):
    (tree / "10").mkdir()
    with pytest.raises(DataError, match="must be named by their digit, 0 to 9 .found '10'"):
        list_labelled_files(tree)
    (tree / "10").rmdir()
    (tree / ".ipynb_checkpoints").mkdir()  # hidden folders are not digits, and not errors
    assert len(list_labelled_files(tree)) == 21

    empty = tmp_path / "empty"
    (empty / "5").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        list_labelled_files(empty)
    only_bad = tmp_path / "bad"
    (only_bad / "1").mkdir(parents=True)
    (only_bad / "1" / "x.png").write_bytes(b"nope")
    with pytest.raises(DataError, match="none of its 1 image"):
        load_labelled_images(only_bad, cache_dir="")
    with pytest.raises(DataError, match="no such folder or CSV file"):
        list_labelled_files(tmp_path / "nowhere")


def test_train_on_a_folder_alone_and_with_mnist(tree, tmp_path, data_dir):
    from conftest import run_cli

    alone = run_cli("train", "--images", tree, "--epochs", "1", "--limit-test", "200", "--save", "", "--no-plots",
                    "--out", tmp_path / "alone", "--data-dir", data_dir, "--threads", "1")
    assert alone.returncode == 0, alone.stderr
    assert "training on 20 images from" in alone.stderr and "broken.png" in alone.stderr
    saved = torch.load(tmp_path / "alone" / "model.pth", weights_only=True)
    assert len(saved["data_checksums"]["images_folder"]) == 64
    both = run_cli("train", "--images", tree, "--with-mnist", "--epochs", "1", "--limit-train", "2000",
                   "--limit-test", "200", "--save", "", "--no-plots", "--out", tmp_path / "both", "--data-dir", data_dir,
                   "--threads", "1")
    assert both.returncode == 0 and "and MNIST's training images" in both.stderr, both.stderr
    assert run_cli("train", "--with-mnist").returncode == 2
