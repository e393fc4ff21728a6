"""A synthetic writer whose handwriting MNIST does not have: a stroke generator that renders digits as pen strokes.

One consistent "person": every digit leans forward by about 18 degrees, is
written with a thick felt pen, 7s are crossed, 4s are open at the top, 1s have
a long flag and a foot, 9s have a straight stem, 3s a flat top, 2s a curl at
the bottom-left. Each sample varies the way one hand does: the control points
wobble, the size, width, lean and rotation change a little. Pictures are dark
ink on white paper, as a scan or a photo would be, so they go through the same
``preprocess`` (inversion included) as any user image.

The strokes are polylines in a unit box (x right, y down), so the browser test
can draw exactly these digits with the mouse on the page's canvas.

    python benchmarks/writer_style.py OUT_DIR --per-digit 10 --seed 1   # writes OUT_DIR/0/*.png … OUT_DIR/9/*.png
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

Stroke = np.ndarray  # float [K, 2], x and y in the unit box


def _arc(cx: float, cy: float, rx: float, ry: float, start_deg: float, end_deg: float, n: int = 24) -> Stroke:
    """Points of an elliptical arc; angles on screen (y down), so increasing angles turn clockwise."""
    t = np.deg2rad(np.linspace(start_deg, end_deg, n))
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


def _line(*points: tuple[float, float]) -> Stroke:
    return np.asarray(points, dtype=np.float64)


def _join(*parts: Stroke) -> Stroke:
    return np.concatenate(parts, 0)


def base_strokes(digit: int) -> list[Stroke]:
    """The writer's template for ``digit``: a list of pen strokes in the unit box, before any variation."""
    if digit == 0:  # slashed, as programmers write it
        return [_arc(0.5, 0.5, 0.3, 0.46, -100, 265, 40), _line((0.78, 0.1), (0.22, 0.9))]
    if digit == 1:  # long flag and a foot
        return [_line((0.12, 0.42), (0.55, 0.03), (0.55, 0.97)), _line((0.3, 0.97), (0.8, 0.97))]
    if digit == 2:  # a curl where the diagonal meets the base
        return [_join(_arc(0.5, 0.3, 0.3, 0.26, 200, 370, 20),
                      _line((0.8, 0.35), (0.26, 0.86)), _arc(0.25, 0.9, 0.07, 0.06, -60, 200, 10)[::-1],
                      _line((0.3, 0.95), (0.88, 0.94)))]
    if digit == 3:  # flat top
        return [_join(_line((0.18, 0.04), (0.8, 0.04), (0.45, 0.42)), _arc(0.48, 0.68, 0.32, 0.27, -90, 150, 24))]
    if digit == 4:  # open at the top: the two strokes never meet above the bar
        return [_line((0.32, 0.0), (0.14, 0.62), (0.88, 0.62)), _line((0.66, 0.22), (0.62, 1.0))]
    if digit == 5:
        return [_line((0.82, 0.04), (0.3, 0.04), (0.26, 0.44)), _arc(0.47, 0.66, 0.32, 0.29, -150, 150, 24)]
    if digit == 6:
        return [_join(_line((0.72, 0.02), (0.4, 0.25), (0.22, 0.55)), _arc(0.48, 0.72, 0.27, 0.25, 180, 530, 32))]
    if digit == 7:  # crossed, with a small hook at the start
        return [_line((0.14, 0.2), (0.16, 0.06), (0.86, 0.06), (0.42, 1.0)), _line((0.3, 0.55), (0.8, 0.52))]
    if digit == 8:
        top = _arc(0.5, 0.26, 0.22, 0.22, 90, 450, 28)
        bottom = _arc(0.5, 0.73, 0.28, 0.25, -90, 270, 32)
        return [_join(top, bottom)]
    if digit == 9:  # straight stem with a hook to the left at the bottom
        return [_join(_arc(0.48, 0.28, 0.27, 0.25, 0, 360, 30), _line((0.75, 0.28), (0.72, 0.85)),
                      _arc(0.55, 0.85, 0.17, 0.13, 0, 150, 10))]
    raise ValueError(f"not a digit: {digit}")


def digit_strokes(digit: int, rng: np.random.Generator, lean_deg: float = 25.0) -> list[Stroke]:
    """One handwritten ``digit``: the template with this writer's lean and one sample's wobble, in the unit box."""
    strokes = [s.copy() for s in base_strokes(digit)]
    # Smooth wobble: a random low-frequency displacement field, the same for all strokes of the digit.
    phase = rng.uniform(0, 2 * math.pi, size=(2, 2))
    amp = rng.normal(0, 0.05, size=(2, 2))
    aspect = rng.uniform(0.85, 1.1)
    lean = math.tan(math.radians(lean_deg + rng.normal(0, 3)))
    turn = math.radians(rng.normal(0, 3))
    out = []
    for s in strokes:
        x, y = s[:, 0].copy(), s[:, 1].copy()
        x += amp[0, 0] * np.sin(2 * math.pi * y + phase[0, 0]) + amp[0, 1] * np.sin(4 * math.pi * x + phase[0, 1])
        y += amp[1, 0] * np.sin(2 * math.pi * x + phase[1, 0]) + amp[1, 1] * np.sin(4 * math.pi * y + phase[1, 1])
        x = 0.5 + (x - 0.5) * aspect + (0.5 - y) * lean  # lean forward: the top moves right
        cx, cy = x - 0.5, y - 0.5
        x, y = 0.5 + cx * math.cos(turn) - cy * math.sin(turn), 0.5 + cx * math.sin(turn) + cy * math.cos(turn)
        # Each stroke lands a little off where the hand meant it, as separate pen strokes do.
        points = np.stack([x, y], 1) + rng.normal(0, 0.025, size=2) + rng.normal(0, 0.006, size=(len(x), 2))
        out.append(points)
    return out


def render(strokes: list[Stroke], size: int = 128, pen: float = 0.11, margin: float = 0.2) -> Image.Image:
    """Draw the strokes as dark ink on white paper, ``size`` pixels square, pen width a fraction of the digit's height."""
    image = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(image)
    span = size * (1 - 2 * margin)
    width = max(1, round(pen * span))
    for s in strokes:
        points = [(size * margin + x * span, size * margin + y * span) for x, y in s]
        draw.line(points, fill=25, width=width, joint="curve")
        for x, y in (points[0], points[-1]):  # round pen ends
            draw.ellipse((x - width / 2, y - width / 2, x + width / 2, y + width / 2), fill=25)
    return image


def sample(digit: int, rng: np.random.Generator) -> Image.Image:
    """One picture of ``digit`` in this writer's hand (pen width varies a little per sample)."""
    return render(digit_strokes(digit, rng), pen=float(rng.uniform(0.07, 0.14)))


def write_folder(out: str | Path, per_digit: int, seed: int) -> Path:
    """``out/<digit>/<i>.png`` for ``per_digit`` samples of every digit, drawn with ``seed``."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    for digit in range(10):
        (out / str(digit)).mkdir(parents=True, exist_ok=True)
        for i in range(per_digit):
            sample(digit, rng).save(out / str(digit) / f"{seed}-{i:04d}.png")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write (sub-folders 0 to 9)")
    parser.add_argument("--per-digit", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(write_folder(args.out, args.per_digit, args.seed))


if __name__ == "__main__":
    main()
