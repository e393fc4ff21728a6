"""Batched, seeded data augmentation: random affine and elastic distortion of whole batches.

Every transform works on a float batch ``[B, 1, H, W]`` in [0, 1] at once: one
``affine_grid`` builds a sampling grid for the whole batch, an optional smooth
random displacement field is added to it (elastic distortion), and one
``grid_sample`` resamples every image. There is no per-sample Python.

Randomness comes only from the ``torch.Generator`` passed in (a CPU generator;
the drawn parameters are moved to the batch's device), so a training run is
reproducible and resumable: the trainer saves the generator's state.

Presets are named (``mnistrec train --augment NAME``); :func:`get_augmentation`
returns ``fn(batch, generator) -> augmented batch``. Labels are never touched:
every transform is small enough to keep a digit the same digit (no flips, at
most 15 degrees of rotation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import MnistrecError

Augmentation = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def affine_theta(
    rotation_deg: torch.Tensor,
    shift_px: torch.Tensor,
    scale: torch.Tensor,
    shear_deg: torch.Tensor,
    size: tuple[int, int] = (28, 28),
) -> torch.Tensor:
    """The ``[B, 2, 3]`` matrices for ``F.affine_grid`` that apply the given forward transforms.

    The forward transform maps input pixel positions (about the image centre)
    to output positions: scale, then shear along x, then rotate
    (counter-clockwise on screen for positive angles), then shift by
    ``shift_px[:, 0]`` pixels to the right and ``shift_px[:, 1]`` pixels down.
    ``affine_grid`` wants the inverse (output -> input), so it is inverted
    here, in closed form for the whole batch.

    ``rotation_deg``, ``scale``, ``shear_deg``: ``[B]``; ``shift_px``: ``[B, 2]``.
    """
    height, width = size
    angle = torch.deg2rad(rotation_deg)
    shear = torch.tan(torch.deg2rad(shear_deg))
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Forward linear part A = R @ Shear @ S in pixel units. Screen y points down, so a
    # counter-clockwise rotation on screen is [[cos, sin], [-sin, cos]] here.
    a11 = scale * cos
    a12 = scale * (cos * shear + sin)
    a21 = -scale * sin
    a22 = scale * (-sin * shear + cos)
    det = a11 * a22 - a12 * a21
    # Inverse linear part.
    i11, i12, i21, i22 = a22 / det, -a12 / det, -a21 / det, a11 / det
    # Pixel shifts in affine_grid's normalised units (align_corners=False: 2 / size per pixel).
    tx = shift_px[:, 0] * 2.0 / width
    ty = shift_px[:, 1] * 2.0 / height
    # Normalised x and y have different pixel scales when H != W; A is in pixels, so
    # conjugate by the aspect ratio (a no-op for square images).
    ratio = width / height
    theta = torch.stack(
        [
            torch.stack([i11, i12 / ratio, -(i11 * tx + i12 / ratio * ty)], 1),
            torch.stack([i21 * ratio, i22, -(i21 * ratio * tx + i22 * ty)], 1),
        ],
        1,
    )
    return theta


def elastic_offsets(
    batch: int, size: tuple[int, int], alpha_px: float, grid_cells: int, generator: torch.Generator
) -> torch.Tensor:
    """A smooth random displacement field ``[B, H, W, 2]`` in ``grid_sample`` units.

    Random displacements (standard deviation ``alpha_px`` pixels) are drawn on a
    coarse ``grid_cells x grid_cells`` lattice and upsampled bicubically: the
    classic elastic distortion (Simard et al., 2003) without a per-image
    Gaussian filter.
    """
    height, width = size
    coarse = torch.randn(batch, 2, grid_cells, grid_cells, generator=generator) * alpha_px
    field = F.interpolate(coarse, size=size, mode="bicubic", align_corners=True)
    field[:, 0] *= 2.0 / width
    field[:, 1] *= 2.0 / height
    return field.permute(0, 2, 3, 1)


def warp(x: torch.Tensor, theta: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Resample the batch ``x`` ``[B, C, H, W]`` with affine ``theta`` (+ optional grid offsets).

    Outside the image is background (0); bilinear interpolation keeps values in [0, 1].
    """
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    if offsets is not None:
        grid = grid + offsets.to(grid.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def shift_whole_pixels(x: torch.Tensor, shift_px: torch.Tensor) -> torch.Tensor:
    """Shift image ``i`` of ``x`` ``[B, C, H, W]`` by the whole pixels ``shift_px[i]`` = (right, down), zero-filled.

    One gather from a zero-padded copy: exact, and about 2.5x faster than
    resampling with ``grid_sample``, whose normalised coordinates are off by a
    few 1e-6 of a pixel.
    """
    b, c, h, w = x.shape
    pixels = shift_px.round().long()
    margin = int(pixels.abs().max()) if b else 0  # read before moving to the device: no device sync
    pixels = pixels.to(x.device)
    padded = F.pad(x, (margin, margin, margin, margin))
    rows = torch.arange(h, device=x.device) + margin - pixels[:, 1:2]  # output row r reads padded row r + margin - dy
    cols = torch.arange(w, device=x.device) + margin - pixels[:, 0:1]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def shift(x: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    """Shift every image of ``x`` by ``dx`` pixels right and ``dy`` down, by resampling (any fraction of a pixel;
    whole pixels land within a few 1e-6 of exact: :func:`shift_whole_pixels` is exact)."""
    b = x.shape[0]
    ones = torch.ones(b)
    theta = affine_theta(torch.zeros(b), torch.tensor([[dx, dy]]).expand(b, 2), ones, torch.zeros(b), tuple(x.shape[-2:]))
    return warp(x, theta.to(x.device))


@dataclass(frozen=True)
class RandomAffine:
    """Uniformly random rotation, shift, scale and shear, plus optional elastic distortion.

    Each image in a batch gets its own parameters; a fraction ``p`` of the batch
    is left unchanged so the network also sees clean digits.
    """

    rotation_deg: float = 0.0
    shift_px: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    shear_deg: float = 0.0
    elastic_alpha_px: float = 0.0  # 0 disables elastic distortion
    elastic_cells: int = 4
    p: float = 1.0
    # Whole-pixel shifts only: a pure integer shift resamples exactly, while sub-pixel
    # bilinear shifts blur every training digit, which test digits never are.
    whole_pixels: bool = False

    @property
    def _shift_only(self) -> bool:
        return self.rotation_deg == 0 and self.shear_deg == 0 and self.scale == (1.0, 1.0) and self.elastic_alpha_px == 0

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b = x.shape[0]
        size = tuple(x.shape[-2:])

        def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
            return torch.rand(b, *shape, generator=generator) * (high - low) + low

        rotation = uniform(-self.rotation_deg, self.rotation_deg)
        if self.whole_pixels:
            limit = int(self.shift_px)
            shift_px = torch.randint(-limit, limit + 1, (b, 2), generator=generator).float()
        else:
            shift_px = uniform(-self.shift_px, self.shift_px, 2)
        # Log-uniform scale: zooming in and out by the same factor are equally likely.
        scale = torch.exp(uniform(math.log(self.scale[0]), math.log(self.scale[1])))
        shear = uniform(-self.shear_deg, self.shear_deg)
        keep = torch.rand(b, generator=generator) >= self.p
        # The identity for the images that are kept clean.
        rotation[keep], shift_px[keep], scale[keep], shear[keep] = 0.0, 0.0, 1.0, 0.0
        if self.whole_pixels and self._shift_only:  # (the draws above still run: the generator's stream is the same)
            return shift_whole_pixels(x, shift_px)
        theta = affine_theta(rotation, shift_px, scale, shear, size).to(x.device)
        offsets = None
        if self.elastic_alpha_px > 0:
            offsets = elastic_offsets(b, size, self.elastic_alpha_px, self.elastic_cells, generator)
            offsets[keep] = 0.0
            offsets = offsets.to(x.device)
        return warp(x, theta, offsets)


PRESETS: dict[str, RandomAffine | None] = {
    "none": None,
    # Whole-pixel translations by up to 2 pixels: the cheapest augmentation that helps MNIST most.
    "shift": RandomAffine(shift_px=2.0, whole_pixels=True),
    # The usual MNIST affine family: small rotations, shifts, zoom and shear.
    "affine": RandomAffine(rotation_deg=10.0, shift_px=2.0, scale=(0.9, 1.1), shear_deg=10.0, p=0.9),
    # Affine plus a gentle elastic distortion of the strokes.
    "affine+elastic": RandomAffine(
        rotation_deg=10.0, shift_px=2.0, scale=(0.9, 1.1), shear_deg=10.0, elastic_alpha_px=0.8, p=0.9
    ),
}


def augmentation_names() -> list[str]:
    return list(PRESETS)


def get_augmentation(name: str) -> Augmentation | None:
    """The preset called ``name`` as ``fn(batch, generator) -> batch`` (``None`` for ``none``)."""
    if name not in PRESETS:
        raise MnistrecError(f"unknown augmentation {name!r}; choose from: {', '.join(augmentation_names())}")
    return PRESETS[name]


def tta_views(x: torch.Tensor, pixels: float = 1.0) -> list[torch.Tensor]:
    """Test-time augmentation: the batch itself and four copies shifted by ``pixels`` left/right/up/down."""
    return [x] + [shift(x, dx, dy) for dx, dy in ((pixels, 0), (-pixels, 0), (0, pixels), (0, -pixels))]
