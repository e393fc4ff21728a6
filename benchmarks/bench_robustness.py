"""Robustness of predictions on user-like images, with and without mnistrec's preprocessing.

MNIST test digits are turned into files that look like what users upload (dark
ink on white paper, off-centre, too big or too small, thick or thin pens, blur,
noise, shadows, EXIF-rotated phone pictures, transparent PNGs, a digit somewhere
on a big page), written as real PNG/JPEG bytes and decoded again. For every
transformation we report how often the model's prediction agrees with its
prediction on the plain digit:

* ``preprocessed``: ``open_image`` + ``preprocess`` (what ``mnistrec predict`` does);
* ``naive``: what a quick script does — ``Image.open(f).convert("L").resize((28, 28))`` / 255.

With the model's calibrated probabilities it also reports the "not sure" flag
(``mnistrec.predict.UNSURE_BELOW``): how many preprocessed predictions are
flagged, and the accuracy of those that are not. ``--also CKPT`` (repeatable)
scores more models on the same files (the comparison that chose the shipped model).

Usage::

    python benchmarks/bench_robustness.py [--checkpoint CKPT] [--also CKPT ...] [--count 1000]

(default checkpoint: the model shipped in the package)

Writes ``benchmarks/results/robustness.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mnistrec.checkpoint import default_checkpoint, load_checkpoint  # noqa: E402
from mnistrec.data import load_split, to_float  # noqa: E402
from mnistrec.evaluate import predict_logits  # noqa: E402
from mnistrec.predict import UNSURE_BELOW  # noqa: E402
from mnistrec.preprocess import open_image, preprocess  # noqa: E402
from machine import machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def repo_relative(path: str) -> str:
    """``path`` relative to the repository when it lies inside it (the JSON is committed: no machine's paths)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(RESULTS.parents[1])) if resolved.is_relative_to(RESULTS.parents[1]) else str(path)


def png(array: np.ndarray, mode: str | None = None, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, "PNG", **save)
    return buffer.getvalue()


def jpeg(array: np.ndarray, quality: int = 90, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=quality, **save)
    return buffer.getvalue()


def to_u8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.round(a * 255), 0, 255).astype(np.uint8)


def upscale(d: np.ndarray, size: int) -> np.ndarray:
    """Float digit (ink = 1) resized smoothly to ``size``×``size``."""
    return np.asarray(Image.fromarray(d.astype(np.float32), mode="F").resize((size, size), Image.Resampling.BICUBIC)).clip(0, 1)


def disk(radius: int) -> np.ndarray:
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius


def paper(ink: np.ndarray, ink_level: float = 0.1, paper_level: float = 0.95) -> np.ndarray:
    """Dark ink on light paper."""
    return paper_level - (paper_level - ink_level) * ink


def orientation_exif(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


# Each transformation maps (float digit 28×28 with ink = 1, rng, index) to encoded file bytes.
def t_mnist_as_is(d, rng, i):
    return png(to_u8(d))


def t_inverted(d, rng, i):
    return png(to_u8(1 - d))


def t_off_centre(d, rng, i):
    canvas = np.zeros((84, 84), np.float32)
    y, x = rng.integers(0, 84 - 28, size=2)
    canvas[y : y + 28, x : x + 28] = d
    return png(to_u8(canvas))


def t_scaled_up(d, rng, i):
    return png(to_u8(upscale(d, 140)))


def t_scaled_down(d, rng, i):
    canvas = np.zeros((56, 56), np.float32)
    small = upscale(d, 20)  # the digit's box is ~7 px tall in a 56 px picture
    y, x = rng.integers(8, 56 - 28, size=2)
    canvas[y : y + 20, x : x + 20] = small
    return png(to_u8(canvas))


def t_thicker(d, rng, i):
    big = upscale(d, 112)
    return png(to_u8(ndi.grey_dilation(big, footprint=disk(5))))


def t_thinner(d, rng, i):
    big = upscale(d, 112)
    return png(to_u8(ndi.grey_erosion(big, footprint=disk(2))))


def t_blur(d, rng, i):
    return png(to_u8(ndi.gaussian_filter(upscale(d, 112), sigma=4)))


def t_noise(d, rng, i):
    big = upscale(d, 112)
    return png(to_u8(big + rng.normal(0, 0.25, big.shape)))


def t_uneven_lighting(d, rng, i):
    size = 112
    y, x = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, 2 * np.pi)
    # A shadow across the page: paper from 0.3 (shade) to 0.95 (lit), ink a little darker than the shade.
    light = 0.3 + 0.65 * np.clip((np.cos(angle) * (x - 0.5) + np.sin(angle) * (y - 0.5)) + 0.5, 0, 1)
    page = light * (1 - 0.85 * upscale(d, size))
    return png(to_u8(page))


def t_exif_rotated(d, rng, i):
    """A phone picture: pixels stored rotated, an EXIF orientation tag saying how to turn them upright."""
    upright = to_u8(paper(upscale(d, 112)))
    # Orientation 6 = "rotate 90° clockwise to display", so the stored pixels are turned 90° anticlockwise; 8 the reverse; 3 = 180°.
    value, k = [(6, 1), (8, -1), (3, 2)][i % 3]
    stored = np.ascontiguousarray(np.rot90(upright, k))
    if i % 2:
        return jpeg(np.stack([stored] * 3, -1), exif=orientation_exif(value))
    return png(stored, exif=orientation_exif(value))


def t_transparent(d, rng, i):
    """Black strokes on a transparent background (a canvas export); the colour under transparent pixels is black too."""
    ink = upscale(d, 112)
    rgba = np.zeros((112, 112, 4), np.uint8)
    rgba[..., 3] = to_u8(ink)
    return png(rgba, mode="RGBA")


def t_large_canvas(d, rng, i):
    """A 60-px digit somewhere on a 400×300 sheet of paper, saved as JPEG."""
    sheet = np.full((300, 400), 0.92, np.float32)
    y, x = rng.integers(10, 300 - 70), rng.integers(10, 400 - 70)
    sheet[y : y + 60, x : x + 60] = paper(upscale(d, 60), paper_level=0.92)
    return jpeg(to_u8(sheet), quality=85)


def t_photo(d, rng, i):
    """All at once: thin pen, big page, dark-on-light, shadow, blur, sensor noise, RGB JPEG."""
    size = 240
    ink = np.zeros((size, size), np.float32)
    y, x = rng.integers(20, size - 140, size=2)
    ink[y : y + 120, x : x + 120] = ndi.grey_erosion(upscale(d, 120), footprint=disk(2))
    yy, xx = np.mgrid[0:size, 0:size] / size
    light = 0.55 + 0.4 * xx
    page = ndi.gaussian_filter(light * (1 - 0.8 * ink), 1.5) + rng.normal(0, 0.04, (size, size))
    rgb = np.stack([page * 0.98, page * 0.95, page * 0.9], -1)
    return jpeg(to_u8(rgb), quality=80)


TRANSFORMS: dict[str, Callable] = {
    "mnist-as-is": t_mnist_as_is,
    "inverted (dark on white)": t_inverted,
    "off-centre (84x84 canvas)": t_off_centre,
    "scaled up (140x140)": t_scaled_up,
    "scaled down (7-px digit)": t_scaled_down,
    "thicker strokes": t_thicker,
    "thinner strokes": t_thinner,
    "blur (sigma 4 @112px)": t_blur,
    "noise (sigma 0.25)": t_noise,
    "uneven lighting": t_uneven_lighting,
    "EXIF-rotated JPEG/PNG": t_exif_rotated,
    "transparent background": t_transparent,
    "embedded in 400x300 page": t_large_canvas,
    "photo (all of the above)": t_photo,
}


def naive(data: bytes) -> torch.Tensor:
    """What a quick script does: greyscale, squash to 28×28, no EXIF, no inversion, no centring."""
    image = Image.open(io.BytesIO(data)).convert("L").resize((28, 28), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


def machine() -> dict:
    info = machine_info()
    load = info["load_average_1_5_15"] or [0.0]
    return {
        **info,
        "shared": load[0] > 1.5,
        "note": "machine shared with other jobs when load_average exceeds the core count; timings are then pessimistic",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="model to score (default: the shipped model)")
    parser.add_argument("--also", action="append", default=[], metavar="CKPT", help="more models scored on the same files")
    parser.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR"))
    parser.add_argument("--count", type=int, default=1000, help="MNIST test digits per transformation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "robustness.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    args.checkpoint = args.checkpoint or str(default_checkpoint())
    loaded = load_checkpoint(args.checkpoint)
    others = {path: load_checkpoint(path).inference_model for path in args.also}
    other_correct = {path: [] for path in args.also}
    images, labels = load_split("test", args.data_dir)
    # Evenly spread over the test set, not just its first digits.
    index = torch.linspace(0, len(images) - 1, args.count).round().long()
    images, labels = images[index], labels[index]
    plain = to_float(images)
    model = loaded.inference_model  # calibrated probabilities, as mnistrec predict shows them
    reference = predict_logits(model, plain).argmax(1)
    sure_correct, sure_count, total = 0, 0, 0
    digits = plain[:, 0].numpy()
    rows, seconds_pre, seconds_naive = [], 0.0, 0.0
    for name, transform in TRANSFORMS.items():
        rng = np.random.default_rng(args.seed)
        files = [transform(d, rng, i) for i, d in enumerate(digits)]
        started = time.perf_counter()
        pre = torch.stack([preprocess(open_image(f)) for f in files])
        t_pre = time.perf_counter() - started
        started = time.perf_counter()
        raw = torch.stack([naive(f) for f in files])
        t_naive = time.perf_counter() - started
        seconds_pre, seconds_naive = seconds_pre + t_pre, seconds_naive + t_naive
        confidence, p_pre = predict_logits(model, pre).softmax(1).max(1)
        p_raw = predict_logits(model, raw).argmax(1)
        sure = confidence >= UNSURE_BELOW
        if name != "mnist-as-is":
            sure_correct += int((p_pre == labels)[sure].sum())
            sure_count, total = sure_count + int(sure.sum()), total + len(files)
            for path, other in others.items():
                other_correct[path].append(predict_logits(other, pre).argmax(1) == labels)
        row = {
            "transformation": name,
            "count": len(files),
            "agreement_preprocessed": round(float((p_pre == reference).double().mean()), 4),
            "agreement_naive": round(float((p_raw == reference).double().mean()), 4),
            "accuracy_preprocessed": round(float((p_pre == labels).double().mean()), 4),
            "accuracy_naive": round(float((p_raw == labels).double().mean()), 4),
            "unsure_preprocessed": round(float((~sure).double().mean()), 4),
            "accuracy_sure_preprocessed": round(float((p_pre == labels)[sure].double().mean()), 4) if sure.any() else None,
            "ms_per_image_preprocessed": round(1000 * t_pre / len(files), 2),
            "ms_per_image_naive": round(1000 * t_naive / len(files), 2),
        }
        rows.append(row)
        print(f"{name:<28} preprocessed {100 * row['agreement_preprocessed']:6.2f}%   naive {100 * row['agreement_naive']:6.2f}%"
              f"   ({row['ms_per_image_preprocessed']:.1f} ms/img)", flush=True)
    user_like = [r for r in rows if r["transformation"] != "mnist-as-is"]
    overall_pre = sum(r["agreement_preprocessed"] * r["count"] for r in user_like) / sum(r["count"] for r in user_like)
    overall_naive = sum(r["agreement_naive"] * r["count"] for r in user_like) / sum(r["count"] for r in user_like)
    accuracy_pre = sum(r["accuracy_preprocessed"] * r["count"] for r in user_like) / sum(r["count"] for r in user_like)
    result = {
        "benchmark": "robustness",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "checkpoint": repo_relative(args.checkpoint),
        "model": loaded.model_name,
        "recipe": (loaded.meta.get("config") or {}).get("recipe"),
        "model_test_accuracy": (loaded.meta.get("metrics") or {}).get("accuracy"),
        "digits_per_transformation": args.count,
        "reference": "prediction of the same model on the plain MNIST test digit",
        "target_agreement": 0.97,
        "overall_agreement_preprocessed": round(overall_pre, 4),
        "overall_agreement_naive": round(overall_naive, 4),
        "overall_accuracy_preprocessed": round(accuracy_pre, 4),
        "unsure_below": UNSURE_BELOW,
        "temperature": loaded.temperature,
        "overall_unsure_preprocessed": round(1 - sure_count / max(total, 1), 4),
        "overall_accuracy_sure_preprocessed": round(sure_correct / max(sure_count, 1), 4),
        "also": {path: round(float(torch.cat(hits).double().mean()), 4) for path, hits in other_correct.items()},
        "preprocessing_time_ratio_vs_naive": round(seconds_pre / max(seconds_naive, 1e-9), 1),
        "transformations": rows,
        "machine": machine(),
    }
    print(f"overall (user-like rows): preprocessed {100 * overall_pre:.2f}%, naive {100 * overall_naive:.2f}%; "
          f"accuracy {100 * accuracy_pre:.2f}%; not sure {100 * result['overall_unsure_preprocessed']:.2f}%, "
          f"accuracy when sure {100 * result['overall_accuracy_sure_preprocessed']:.2f}%")
    for path, accuracy in result["also"].items():
        print(f"  also {path}: accuracy (user-like rows, preprocessed) {100 * accuracy:.2f}%")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
