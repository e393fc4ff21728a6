"""Several digits in one picture (``mnistrec predict --multi``): ink components merged and split into digits.

Time and memory are near-linear in the picture and the number of marks: one
labelling pass (OpenCV's ``connectedComponentsWithStats``), a sort and a sweep
over the components' column ranges, and per digit only its own box. A page of
hundreds of separate marks (dots on squared paper) is no number: it is refused
early with a clear error rather than read as hundreds of digits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from PIL import Image
from scipy import ndimage as ndi

from .errors import ImageError
from .field import to_field
from .ink import find_ink

#: More separate marks (after specks are dropped) than a written number has: refused.
MAX_MARKS = 300
#: More digits than a written number has (after touching digits are cut): refused.
MAX_DIGITS = 40
_TOO_MANY = "too many separate marks to read as a number"


@dataclass
class _Group:
    """Components read as one digit (or touching digits), with their joint box (end-exclusive)."""

    ids: list[int]
    x0: int
    x1: int
    y0: int
    y1: int
    alive: bool = field(default=True)

    def overlaps(self, other: _Group) -> bool:
        """Column ranges overlapping by more than half of the narrower one (pieces of one digit)."""
        overlap = min(self.x1, other.x1) - max(self.x0, other.x0)
        return overlap > 0.5 * min(self.x1 - self.x0, other.x1 - other.x0)

    def absorb(self, other: _Group) -> None:
        self.ids += other.ids
        self.x0, self.x1 = min(self.x0, other.x0), max(self.x1, other.x1)
        self.y0, self.y1 = min(self.y0, other.y0), max(self.y1, other.y1)
        other.alive = False


def _merge_columns(stats: np.ndarray) -> list[_Group]:
    """Merge components whose column ranges overlap by more than half the narrower one (a 5's detached bar).

    A sweep in order of left edge: a component can only overlap groups that end
    after it starts (the active ones), so the cost is a sort plus the active set,
    not all pairs.
    """
    order = np.lexsort((stats[:, 1] + stats[:, 3], stats[:, 0]))  # by left edge, then right edge
    groups: list[_Group] = []
    active: list[_Group] = []
    for index in order:
        x, w = int(stats[index, 0]), int(stats[index, 1])
        y, h = int(stats[index, 2]), int(stats[index, 3])
        new = _Group([int(index) + 1], x, x + w, y, y + h)
        active = [g for g in active if g.alive and g.x1 > new.x0]
        target = next((g for g in active if g.overlaps(new)), None)
        if target is None:
            groups.append(new)
            active.append(new)
            continue
        target.absorb(new)
        merged = True
        while merged:  # the grown group may now overlap another active one
            merged = False
            for other in active:
                if other is not target and other.alive and target.overlaps(other):
                    target.absorb(other)
                    merged = True
    return sorted((g for g in groups if g.alive), key=lambda g: g.x0)


def _cuts(group: _Group, piece: np.ndarray, height: int) -> list[int]:
    """Column cuts (relative to the group's box) of a blob holding touching digits; [0, width] for one digit.

    A handwritten digit is rarely wider than tall (MNIST: width/height <= 1.1 for
    99 %): a blob wider than 1.15x the digit height is cut into round(width /
    (0.75 x height)) digits at the columns with the least ink near even positions.
    """
    width = group.x1 - group.x0
    parts = round(width / (0.75 * height)) if width > 1.15 * height else 1
    if parts > MAX_DIGITS:
        raise ImageError(f"{_TOO_MANY} (a mark {width} px wide and {height} px high)")
    cuts = [0]
    if parts > 1:
        column_ink = piece.sum(0).astype(np.float64)
        for k in range(1, parts):
            guess = k * width / parts
            lo, hi = int(guess - 0.25 * width / parts), int(guess + 0.25 * width / parts) + 1
            cuts.append(lo + int(np.argmin(column_ink[lo:hi])))
    return [*cuts, width]


def _digit_boxes(mask: np.ndarray) -> list[tuple[slice, slice, np.ndarray]]:
    """Single digits, left to right, each as (rows, cols, its mask within that box): components merged and split.

    * pieces of one digit (a 5 whose bar is detached, a broken 4) overlap
      horizontally with each other: they are merged (:func:`_merge_columns`);
    * touching digits form one component much wider than a digit is tall: it is
      cut (:func:`_cuts`).

    Raises :class:`ImageError` for more than :data:`MAX_MARKS` components or
    :data:`MAX_DIGITS` digits.
    """
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    if count - 1 > MAX_MARKS:
        raise ImageError(f"{_TOO_MANY} ({count - 1} found, at most {MAX_MARKS})")
    stats = stats[1:, [cv2.CC_STAT_LEFT, cv2.CC_STAT_WIDTH, cv2.CC_STAT_TOP, cv2.CC_STAT_HEIGHT]]
    groups = _merge_columns(stats)
    height = max(g.y1 - g.y0 for g in groups)
    owner = np.zeros(count, np.int32)  # label -> 1 + its group's index
    for number, g in enumerate(groups, start=1):
        owner[g.ids] = number
    digits: list[tuple[slice, slice, np.ndarray]] = []
    for number, g in enumerate(groups, start=1):
        rows = slice(g.y0, g.y1)
        piece = owner[labels[rows, g.x0 : g.x1]] == number
        cuts = _cuts(g, piece, height)
        for a, b in zip(cuts[:-1], cuts[1:]):
            part = piece[:, a:b]
            if part.any():
                digits.append((rows, slice(g.x0 + a, g.x0 + b), part))
        if len(digits) > MAX_DIGITS:
            raise ImageError(f"{_TOO_MANY} (more than {MAX_DIGITS} digits)")
    return digits


def split_digits(image: Image.Image | np.ndarray, invert: str = "auto") -> list[torch.Tensor]:
    """Each digit of a written number as an MNIST-style ``[1, 28, 28]`` tensor, left to right.

    Uses the same ink detection as :func:`mnistrec.preprocess.preprocess`, then
    :func:`_digit_boxes`; each digit keeps the soft ink within one pixel of its
    own mask (the anti-aliased rim). Raises :class:`ImageError` when there is no
    ink, or too many separate marks to be a number.
    """
    soft, mask = find_ink(image, invert)
    height, width = mask.shape
    tensors = []
    for rows, cols, part in _digit_boxes(mask):
        # The digit's box plus a 2-px margin: room for the 1-px rim that to_field keeps, and for the dilation.
        top, left = max(0, rows.start - 2), max(0, cols.start - 2)
        bottom, right = min(height, rows.stop + 2), min(width, cols.stop + 2)
        own = np.zeros((bottom - top, right - left), bool)
        own[rows.start - top : rows.stop - top, cols.start - left : cols.stop - left] = part
        near = ndi.binary_dilation(own, structure=np.ones((3, 3), bool))
        tensors.append(to_field(np.where(near, soft[top:bottom, left:right], 0.0).astype(np.float32), own))
    return tensors
