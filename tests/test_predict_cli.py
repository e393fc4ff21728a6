"""`mnistrec predict` end to end in a subprocess: real files, bad files, JSON schema, --multi, --save-preprocessed, --explain."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def zero_by_zero_png() -> bytes:
    """A PNG whose header says 0×0 pixels (Pillow refuses to identify it)."""
    header = struct.pack(">IIBBBBB", 0, 0, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b"")


def user_digit(digit: np.ndarray, size: int = 120) -> Image.Image:
    """A real MNIST digit as a user would send it: dark ink on white, bigger, off-centre."""
    big = np.asarray(Image.fromarray(digit).resize((size // 2, size // 2), Image.Resampling.BICUBIC))
    page = np.full((size, size), 250, np.uint8)
    page[10 : 10 + size // 2, 30 : 30 + size // 2] = 250 - (big.astype(np.int32) * 230 // 255)
    return Image.fromarray(page)


@pytest.fixture(scope="module")
def images(tmp_path_factory, mnist):
    """Good and bad files in a folder tree; returns (folder, {name: expected digit}, [bad names])."""
    root = tmp_path_factory.mktemp("predict-inputs")
    labels = mnist.test_labels.tolist()
    expected = {}
    (root / "sub").mkdir()
    for k, index in enumerate([0, 1, 2, 3]):
        image = user_digit(mnist.test_images[index].numpy())
        name = ["a.png", "b.jpg", "c.webp", "sub/d.tiff"][k]
        image.convert("RGB").save(root / name) if name.endswith("jpg") else image.save(root / name)
        expected[name] = labels[index]
    png_bytes = (root / "a.png").read_bytes()
    (root / "not_an_image.png").write_text("hello, I am text")
    (root / "truncated.png").write_bytes(png_bytes[: len(png_bytes) // 2])
    Image.new("L", (64, 64), 255).save(root / "blank.png")
    Image.new("1", (10000, 6000)).save(root / "bomb.png")  # 60 Mpx, a few KB on disk
    (root / "zero.png").write_bytes(zero_by_zero_png())
    bad = ["not_an_image.png", "truncated.png", "blank.png", "bomb.png", "zero.png"]
    return root, expected, bad


def test_bad_files_one_line_each_others_still_predicted(images, mlp_checkpoint, tmp_path):
    root, expected, bad = images
    missing = root / "missing.png"
    out_dir, explain = tmp_path / "seen", tmp_path / "explain.png"
    args = [str(root / n) for n in ["a.png", *bad, "b.jpg"]] + [str(missing)]
    result = run_cli("predict", mlp_checkpoint, *args, "--json", "--save-preprocessed", out_dir, "--explain", explain)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("mnistrec: error:")]
    assert len(errors) == len(bad) + 1
    messages = {Path(line.split(": ")[2]).name: line for line in errors}
    assert "not an image" in messages["not_an_image.png"]
    assert "truncated or corrupt" in messages["truncated.png"]
    assert "no ink" in messages["blank.png"]
    assert "decompression bomb" in messages["bomb.png"]
    assert "not an image" in messages["zero.png"]
    assert "no such file" in messages["missing.png"]
    assert "6 of 8 file(s) failed" in result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["path"]).name for r in lines] == ["a.png", "b.jpg"]
    for r in lines:
        # Exactly the shared schema, "path" first.
        assert list(r) == ["path", "digit", "confidence", "unsure", "probabilities", "top_k"]
        assert len(r["probabilities"]) == 10 and abs(sum(r["probabilities"]) - 1) < 1e-4
        assert r["digit"] == int(np.argmax(r["probabilities"])) == r["top_k"][0]["digit"]
        assert r["confidence"] == pytest.approx(max(r["probabilities"]))
        assert len(r["top_k"]) == 3 and list(r["top_k"][0]) == ["digit", "probability"]
        assert r["top_k"][0]["probability"] >= r["top_k"][1]["probability"] >= r["top_k"][2]["probability"]
        assert r["digit"] == expected[Path(r["path"]).name]
    # --save-preprocessed: the 28×28 the model saw, which gives the same prediction when fed directly.
    saved = sorted(p.name for p in out_dir.iterdir())
    assert saved == ["a.png", "b.png"]
    seen = np.asarray(Image.open(out_dir / "a.png"))
    assert seen.shape == (28, 28) and seen.dtype == np.uint8 and seen[0, 0] == 0 and seen.max() > 200
    from mnistrec.checkpoint import load_checkpoint
    from mnistrec.predict import predict_tensors

    again = predict_tensors(load_checkpoint(mlp_checkpoint).model, torch.from_numpy(seen / 255.0).float()[None, None])
    assert again[0]["digit"] == lines[0]["digit"]
    # --explain: a real PNG with four panels per row.
    with Image.open(explain) as picture:
        assert picture.format == "PNG" and picture.width > 600 and picture.height > 150


def test_folder_table_recursive_and_top_k(images, mlp_checkpoint):
    root, expected, bad = images
    flat = run_cli("predict", mlp_checkpoint, root, "--top-k", "2")
    assert flat.returncode == 1 and "Traceback" not in flat.stderr
    assert "sub/d.tiff" not in flat.stdout and "a.png" in flat.stdout
    header, *rows = flat.stdout.splitlines()
    assert header.split()[:3] == ["path", "digit", "confidence"]
    row = next(r for r in rows if r.startswith(str(root / "a.png")))
    assert row.split()[1] == str(expected["a.png"]) and row.count("%") == 3  # confidence + top-2
    deep = run_cli("predict", mlp_checkpoint, root, "--recursive", "--json")
    names = [Path(json.loads(line)["path"]).relative_to(root).as_posix() for line in deep.stdout.splitlines()]
    assert sorted(names) == sorted(expected)
    assert all(json.loads(line)["digit"] == expected[n] for line, n in zip(deep.stdout.splitlines(), names))


def test_all_good_exits_zero_and_bad_checkpoint_one_line(images, mlp_checkpoint, tmp_path):
    root, expected, bad = images
    ok = run_cli("predict", mlp_checkpoint, root / "a.png", "--invert", "auto")
    assert ok.returncode == 0 and ok.stderr == ""
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    broken = run_cli("predict", tmp_path / "junk.pth", root / "a.png")
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    assert len(broken.stderr.strip().splitlines()) == 1 and broken.stderr.startswith("mnistrec: error:")


def test_multi_number_with_touching_digits(mnist, mlp_checkpoint, tmp_path):
    from test_preprocess import _paste, _pick

    separate = 255 - np.pad(_paste([_pick(mnist, d) for d in (3, 7, 2)]), 10)
    touching = np.pad(_paste([_pick(mnist, 4), _pick(mnist, 0)], overlap=6), 8)
    Image.fromarray(separate).resize((separate.shape[1] * 4, separate.shape[0] * 4)).save(tmp_path / "n372.png")
    Image.fromarray(touching).save(tmp_path / "n40.png")
    out = tmp_path / "digits"
    result = run_cli("predict", mlp_checkpoint, tmp_path / "n372.png", tmp_path / "n40.png", "--multi", "--json",
                     "--save-preprocessed", out)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["number"] for r in rows] == ["372", "40"]
    for r in rows:
        assert list(r) == ["path", "number", "unsure", "digits"]
        assert all(list(d) == ["digit", "confidence", "unsure", "probabilities", "top_k"] for d in r["digits"])
    assert sorted(p.name for p in out.iterdir()) == ["n372_0.png", "n372_1.png", "n372_2.png", "n40_0.png", "n40_1.png"]
    table = run_cli("predict", mlp_checkpoint, tmp_path / "n372.png", "--multi")
    assert table.stdout.splitlines()[1].split()[1] == "372"
