"""Speed of ``open_image`` + ``preprocess`` (what the CLI, the API and the page run per picture), one thread.

Inputs are real encoded files built here, deterministically:

* ``canvas 140x140 PNG``: what the web page sends (dark strokes on white, an 8-bit grey PNG it encodes itself);
* ``canvas 140x140 RGBA PNG``: the canvas's own PNG, which the page sent before (and sends without CompressionStream);
* ``mnist 28x28 PNG``: an already MNIST-like picture (light ink on black);
* ``page 400x300 JPEG``: a digit on a sheet of paper, slightly uneven light;
* ``photo 12 Mpx JPEG``: a 4032x3024 phone photo of a digit on paper (shadow, noise, RGB);
* ``photo 12 Mpx PNG``: the same pixels losslessly (no draft decoding possible).

Each figure is the median (and p90) of ``--repeat`` calls after warm-up. The machines
are shared and noisy, so every figure is also given as a ratio to a reference measured
in the same run: decoding a 28x28 PNG (``Image.open(...).load()``).

Usage::

    python benchmarks/bench_preprocess.py [--repeat 200] [--out benchmarks/results/preprocess.json]
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

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from machine import machine_info  # noqa: E402
from serving import page_png  # noqa: E402

from mnistrec.preprocess import open_image, preprocess  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: The targets of issue 15 (milliseconds, median, one thread).
TARGETS = {"canvas 140x140 PNG": 1.0, "canvas 140x140 RGBA PNG": 1.0, "photo 12 Mpx JPEG": 50.0}


def encode(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def draw_seven(size: tuple[int, int], box: tuple[int, int, int, int], width: int, ink: int, paper: int, mode: str = "L"):
    """A hand-drawn-looking 7 with a bar (polyline strokes with round joints) in ``box`` on a ``size`` page."""
    image = Image.new(mode, size, paper)
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    points = [(x0 + 0.1 * w, y0 + 0.15 * h), (x0 + 0.9 * w, y0 + 0.1 * h),
              (x0 + 0.55 * w, y0 + 0.55 * h), (x0 + 0.35 * w, y0 + 0.95 * h)]
    draw.line(points, fill=ink, width=width, joint="curve")
    draw.line([(x0 + 0.35 * w, y0 + 0.55 * h), (x0 + 0.8 * w, y0 + 0.52 * h)], fill=ink, width=width)
    return image


def photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A phone photo of a digit on paper: light falling off to one side, sensor noise, a warm tint."""
    width, height = size
    box = (width // 3, height // 4, width // 3 + height // 2, height * 3 // 4)
    strokes = np.asarray(draw_seven(size, box, height // 60, 255, 0), dtype=np.float32) / 255
    light = np.linspace(0.6, 0.95, width, dtype=np.float32)[None, :]
    grey = light * (1 - 0.8 * strokes) + np.random.default_rng(seed).normal(0, 0.03, (height, width)).astype(np.float32)
    rgb = np.clip(np.stack([grey * 0.98, grey * 0.95, grey * 0.9], -1) * 255, 0, 255).astype(np.uint8)
    return Image.fromarray(rgb)


def inputs() -> dict[str, bytes]:
    canvas = draw_seven((140, 140), (30, 20, 110, 120), 9, 0, 255)
    mnist = draw_seven((28, 28), (6, 4, 22, 24), 2, 255, 0)
    page = np.asarray(draw_seven((400, 300), (150, 100, 210, 170), 4, 30, 235), dtype=np.float32)
    page = page * np.linspace(0.85, 1.0, 400, dtype=np.float32)[None, :]
    big = photo((4032, 3024))
    return {
        "canvas 140x140 PNG": page_png(np.asarray(canvas.convert("L"))),
        "canvas 140x140 RGBA PNG": encode(canvas.convert("RGBA"), "PNG"),
        "mnist 28x28 PNG": encode(mnist, "PNG"),
        "page 400x300 JPEG": encode(Image.fromarray(page.astype(np.uint8)), "JPEG", quality=85),
        "photo 12 Mpx JPEG": encode(big, "JPEG", quality=90),
        "photo 12 Mpx PNG": encode(big, "PNG", compress_level=1),
    }


def timed(call: Callable[[], object], repeat: int, warmup: int = 3) -> list[float]:
    """Milliseconds of each of ``repeat`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - started))
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=200, help="timed calls per small input (big photos: a tenth)")
    parser.add_argument("--out", default=str(RESULTS / "preprocess.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass
    files = inputs()
    reference_png = files["mnist 28x28 PNG"]
    reference = timed(lambda: Image.open(io.BytesIO(reference_png)).load(), args.repeat)
    reference_ms = float(np.median(reference))
    rows = []
    for name, data in files.items():
        repeat = max(10, args.repeat // 10) if "12 Mpx" in name else args.repeat
        times = timed(lambda data=data: preprocess(open_image(data, draft=True)), repeat)
        median = float(np.median(times))
        row = {"input": name, "bytes": len(data), "calls": repeat, "median_ms": round(median, 3),
               "p90_ms": round(float(np.percentile(times, 90)), 3),
               "min_ms": round(float(np.min(times)), 3), "ratio_to_reference": round(median / reference_ms, 1)}
        if name in TARGETS:
            row["target_ms"] = TARGETS[name]
        rows.append(row)
        print(f"{name:<22} median {median:8.3f} ms  p90 {row['p90_ms']:8.3f} ms  = {row['ratio_to_reference']:7.1f}x reference",
              flush=True)
    result = {
        "benchmark": "preprocess",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "what": "open_image(data, draft=True) + preprocess, one thread, median of repeated calls on the same bytes",
        "reference": "Image.open(28x28 PNG).load(), same run",
        "reference_median_ms": round(reference_ms, 4),
        "rows": rows,
        "machine": machine_info(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"reference (decode a 28x28 PNG): {reference_ms:.3f} ms; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
