"""Batched augmentation: geometry, value range, order of the batch (labels), determinism under a seed."""

import pytest
import torch

from mnistrec.augment import (affine_theta, augmentation_names, get_augmentation, shift, shift_whole_pixels, tta_views,
                              warp)
from mnistrec.data import to_float
from mnistrec.errors import MnistrecError

RANDOM_PRESETS = [name for name in augmentation_names() if name != "none"]


def blob(rows=slice(10, 13), cols=slice(10, 13), batch=2):
    x = torch.zeros(batch, 1, 28, 28)
    x[:, 0, rows, cols] = 1.0
    return x


def ink(image):
    return (image[0] > 0.5).nonzero()


def test_a_known_shift_moves_a_blob_exactly():
    moved = shift(blob(), 3, -2)  # 3 pixels right, 2 up
    expected = blob(slice(8, 11), slice(13, 16))
    assert torch.allclose(moved, expected, atol=1e-6)


def test_rotation_is_counter_clockwise_on_screen_and_scale_zooms_about_the_centre():
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 13:15, 22:24] = 1.0  # right of the centre
    rotated = warp(x, affine_theta(torch.tensor([90.0]), torch.zeros(1, 2), torch.ones(1), torch.zeros(1)))
    row, col = ink(rotated[0]).float().mean(0)
    assert row < 8 and 12 < col < 15  # now above the centre
    zoomed = warp(x, affine_theta(torch.zeros(1), torch.zeros(1, 2), torch.tensor([0.5]), torch.zeros(1)))
    cols = torch.arange(28.0)
    centre_col = float((zoomed[0, 0].sum(0) * cols).sum() / zoomed.sum())
    assert abs(centre_col - (13.5 + (22.5 - 13.5) / 2)) < 0.3  # halfway to the centre


@pytest.mark.parametrize("name", RANDOM_PRESETS)
def test_presets_keep_shape_range_and_batch_order(name, mnist):
    images = to_float(mnist.train_images[:64])
    augment = get_augmentation(name)
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= 0 and out.max() <= 1 + 1e-6
    assert not torch.equal(out, images)
    # Labels stay valid: output i depends on input i alone (no mixing or reordering of the batch).
    changed = images.clone()
    changed[3] = torch.flip(changed[3], (-1,))
    changed[5] = 0.0
    out_changed = augment(changed, torch.Generator().manual_seed(0))
    differs = (out_changed != out).flatten(1).any(1)
    assert differs.nonzero().flatten().tolist() == [3, 5]
    assert out_changed[5].abs().max() == 0
    assert (out.sum((1, 2, 3)) > 0.6 * images.sum((1, 2, 3))).all()  # no digit pushed out of the frame


@pytest.mark.parametrize("name", RANDOM_PRESETS)
def test_same_seed_same_batch_other_seed_other_batch(name):
    x = blob(batch=16)
    augment = get_augmentation(name)
    a = augment(x, torch.Generator().manual_seed(7))
    b = augment(x, torch.Generator().manual_seed(7))
    c = augment(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_shift_preset_moves_by_whole_pixels_only():
    out = get_augmentation("shift")(blob(batch=32), torch.Generator().manual_seed(0))
    assert set(torch.unique(out).tolist()) <= {0.0, 1.0}  # no bilinear blur
    offsets = torch.stack([ink(img).min(0).values - 10 for img in out])
    assert offsets.abs().max() <= 2 and len(torch.unique(offsets[:, 1])) > 1


def test_whole_pixel_gather_is_the_resampled_shift_of_each_image(mnist):
    """The shift preset's gather equals per-image grid_sample resampling (to its 1e-5 rounding) on real digits."""
    digits = to_float(mnist.train_images[:64])
    pixels = torch.randint(-3, 4, (64, 2), generator=torch.Generator().manual_seed(1)).float()
    pixels[0] = 0.0
    resampled = warp(digits, affine_theta(torch.zeros(64), pixels, torch.ones(64), torch.zeros(64)))
    gathered = shift_whole_pixels(digits, pixels)
    assert gathered.shape == digits.shape and torch.equal(gathered[0], digits[0])
    assert torch.allclose(gathered, resampled, atol=1e-5)
    assert set(torch.unique(shift_whole_pixels(blob(batch=4), pixels[:4])).tolist()) <= {0.0, 1.0}


def test_tta_views_are_the_image_and_four_one_pixel_shifts():
    views = tta_views(blob(batch=1))
    assert len(views) == 5 and torch.equal(views[0], blob(batch=1))
    assert torch.allclose(views[1], shift(blob(batch=1), 1, 0))


def test_none_is_no_augmentation_and_unknown_names_list_the_choices():
    assert get_augmentation("none") is None
    with pytest.raises(MnistrecError, match="unknown augmentation 'mixup'; choose from: none, shift, affine, affine\\+elastic"):
        get_augmentation("mixup")
