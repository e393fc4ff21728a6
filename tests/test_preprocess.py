"""Each preprocessing step on constructed images, and multi-digit splitting of real MNIST digits pasted together."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage as ndi

from mnistrec.errors import ImageError
from mnistrec.preprocess import open_image, preprocess, split_digits


def ink_box(t: torch.Tensor, level: float = 0.3) -> tuple[int, int]:
    """(height, width) of the box of pixels above ``level`` in a [1, 28, 28] tensor."""
    mask = t[0].numpy() > level
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def encode(image: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def test_output_contract_and_blob_centred_by_mass():
    # A filled disc in the top-left corner of a big black picture, light on dark (MNIST polarity).
    image = np.zeros((200, 300), np.uint8)
    yy, xx = np.mgrid[0:200, 0:300]
    image[(yy - 40) ** 2 + (xx - 50) ** 2 <= 30**2] = 255
    t = preprocess(image)
    assert t.shape == (1, 28, 28) and t.dtype == torch.float32
    assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0 and float(t.max()) > 0.9
    cy, cx = ndi.center_of_mass(t[0].numpy())
    assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5
    assert max(ink_box(t, 0.5)) in (19, 20, 21)
    assert float(t[0, 0, 0]) == 0.0 and float(t[0, -1, -1]) == 0.0


def test_centre_of_mass_not_box_centre():
    # An L shape: its mass is off the centre of its box, and MNIST centres the mass.
    image = np.zeros((100, 100), np.uint8)
    image[10:90, 10:30] = 255
    image[70:90, 10:90] = 255
    t = preprocess(image)[0].numpy()
    cy, cx = ndi.center_of_mass(t)
    assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5
    rows, cols = np.flatnonzero((t > 0.3).any(1)), np.flatnonzero((t > 0.3).any(0))
    # The box itself is not centred (an L's mass sits low and left of its box's centre).
    assert abs((rows[0] + rows[-1]) / 2 - 14) > 1 and abs((cols[0] + cols[-1]) / 2 - 14) > 1


def test_aspect_ratio_kept_and_longer_side_20():
    # A tall 1:4 bar becomes 20 px tall and about 5 px wide, not a square.
    image = np.zeros((300, 300), np.uint8)
    image[50:250, 130:180] = 255
    h, w = ink_box(preprocess(image), 0.5)
    assert h == 20 and 4 <= w <= 6
    # And a wide bar: the width is the longer side.
    h, w = ink_box(preprocess(image.T.copy()), 0.5)
    assert w == 20 and 4 <= h <= 6


def test_dark_on_light_is_inverted_auto_yes_no():
    light = np.zeros((60, 60), np.uint8)
    light[10:50, 25:35] = 255
    dark = 255 - light  # black bar on white paper
    a, b = preprocess(light), preprocess(dark)
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(preprocess(dark, invert="yes"), a, atol=1e-5)
    assert torch.allclose(preprocess(light, invert="no"), a, atol=1e-5)
    # Forcing the wrong polarity makes the paper the "ink": a different picture.
    assert not torch.allclose(preprocess(dark, invert="no"), a, atol=0.1)
    with pytest.raises(ImageError):
        preprocess(light, invert="maybe")


def test_uneven_lighting_does_not_become_ink():
    # Dark bar on paper lit from 0.35 on the left to 1.0 on the right: the shadow must not be cropped in.
    x = np.linspace(0.35, 1.0, 200)[None, :].repeat(200, 0)
    page = x.copy()
    page[40:160, 120:140] *= 0.2
    t = preprocess((page * 255).astype(np.uint8))
    h, w = ink_box(t, 0.3)
    assert h == 20 and w <= 5  # only the bar, not the shaded left side


def test_rgba_transparent_background():
    # Black strokes on a fully transparent background (colour under it also black), as a canvas export.
    rgba = np.zeros((80, 80, 4), np.uint8)
    rgba[20:60, 35:45, 3] = 255
    from_file = preprocess(open_image(encode(Image.fromarray(rgba, mode="RGBA"))))
    reference = np.zeros((80, 80), np.uint8)
    reference[20:60, 35:45] = 255
    assert torch.allclose(from_file, preprocess(reference), atol=1e-5)
    with pytest.raises(ImageError, match="no ink"):
        preprocess(np.zeros((10, 10, 4), np.uint8))  # fully transparent


def test_16_bit_greyscale_png_and_palette_and_rgb():
    bar = np.zeros((64, 64), np.uint16)
    bar[8:56, 28:36] = 60000
    decoded = open_image(encode(Image.fromarray(bar)))
    assert decoded.mode.startswith("I")
    t16 = preprocess(decoded)
    t8 = preprocess((bar // 257).astype(np.uint8))
    assert torch.allclose(t16, t8, atol=0.02)
    rgb = Image.fromarray((bar // 257).astype(np.uint8)).convert("RGB")
    no_dither = Image.Dither.NONE  # dithering would turn the bar into a dot pattern, a different picture
    for image in (rgb, rgb.convert("P", palette=Image.Palette.ADAPTIVE, dither=no_dither), rgb.convert("1", dither=no_dither)):
        assert torch.allclose(preprocess(open_image(encode(image))), t8, atol=0.02)
    assert torch.allclose(preprocess(bar.astype(np.float32) / 65535), t8, atol=0.02)


@pytest.mark.parametrize("orientation,k", [(6, 1), (8, -1), (3, 2)])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_applied(tmp_path, orientation, k, fmt):
    # An upright "L"; stored rotated, with the EXIF tag that turns it upright again.
    upright = np.full((90, 60), 255, np.uint8)
    upright[10:80, 10:22] = 0
    upright[68:80, 10:50] = 0
    stored = np.ascontiguousarray(np.rot90(upright, k))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"photo.{fmt.lower()}"
    Image.fromarray(stored).convert("RGB").save(path, fmt, exif=exif)
    image = open_image(path)
    assert image.size == (60, 90)
    got = preprocess(image)
    assert float((got - preprocess(upright)).abs().max()) < 0.25  # JPEG artefacts only


def test_big_jpeg_draft_decoding_gives_the_same_digit(tmp_path):
    # A 3000×2000 "phone photo" of a dark bar: draft decoding is smaller but preprocesses to the same 28×28.
    page = np.full((2000, 3000), 240, np.uint8)
    page[400:1600, 1400:1560] = 20
    Image.fromarray(page).save(tmp_path / "photo.jpg", quality=90)
    full, fast = open_image(tmp_path / "photo.jpg"), open_image(tmp_path / "photo.jpg", draft=True)
    assert full.size == (3000, 2000) and 1024 <= max(fast.size) < 3000
    a, b = preprocess(full), preprocess(fast)
    assert ink_box(a) == ink_box(b) == (20, 3)
    # The bar's mass sits exactly between two pixels, so a rounding tie may shift it by one row; both are centred.
    for t in (a, b):
        assert all(abs(c - 14) <= 0.5 for c in ndi.center_of_mass(t[0].numpy()))
    assert float((a[0].sum(0) - b[0].sum(0)).abs().max()) < 1.0  # same columns of ink (of 20 px each), JPEG aside


def test_large_canvas_numpy_inputs_of_many_dtypes():
    small = np.zeros((28, 28), np.uint8)
    small[6:22, 12:16] = 255
    t = preprocess(small)
    for array in (small.astype(bool), small.astype(np.int64), small.astype(np.float64), small.astype(np.float32) / 255,
                  np.stack([small] * 3, -1), small[:, :, None], small[None]):
        assert torch.allclose(preprocess(array), t, atol=1e-4)
    with pytest.raises(ImageError):
        preprocess(np.zeros((2, 3, 4, 5)))


def test_mnist_digit_is_nearly_unchanged(mnist):
    # A 28×28 MNIST digit goes through the same steps and comes out (almost) as it was.
    digits = mnist.test_images[:50].float() / 255
    out = torch.stack([preprocess(d.numpy()) for d in digits])[:, 0]
    assert float((out - digits).abs().mean()) < 0.02


def test_thin_pen_is_thickened():
    # A 2-px line on a 600-px picture would shrink to a 0.07-px ghost; it must stay a visible stroke.
    image = np.full((600, 600), 255, np.uint8)
    image[20:580, 299:301] = 0
    t = preprocess(image)
    assert float(t.max()) > 0.9
    assert 1 <= ink_box(t, 0.5)[1] <= 3


def test_blank_and_noise_only_have_no_ink():
    for blank in (np.zeros((50, 50), np.uint8), np.full((50, 50), 200, np.uint8)):
        with pytest.raises(ImageError, match="no ink"):
            preprocess(blank)


def test_zero_by_zero_images():
    for empty in (np.zeros((0, 0), np.uint8), np.zeros((0, 5, 3), np.uint8), Image.new("L", (0, 0)), Image.new("RGBA", (4, 0))):
        with pytest.raises(ImageError, match="nothing to read"):
            preprocess(empty)


def test_open_image_errors(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        open_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="not an image"):
        open_image(b"this is text")
    png = encode(Image.fromarray(np.zeros((100, 100), np.uint8)))
    with pytest.raises(ImageError, match="truncated or corrupt"):
        open_image(png[: len(png) // 2])
    with pytest.raises(ImageError, match="decompression bomb"):
        open_image(png, max_pixels=9_999)


def _paste(digits: list[np.ndarray], overlap: int = 0) -> np.ndarray:
    """MNIST digits side by side (each trimmed to its ink columns plus 2 px), pasted with ``overlap`` px overlap."""
    parts = []
    for d in digits:
        cols = np.flatnonzero(d.max(0) > 0)
        parts.append(d[:, max(0, cols[0] - 2) : cols[-1] + 3].astype(np.float32))
    width = sum(p.shape[1] for p in parts) - overlap * (len(parts) - 1)
    canvas = np.zeros((28, width), np.float32)
    x = 0
    for p in parts:
        canvas[:, x : x + p.shape[1]] = np.maximum(canvas[:, x : x + p.shape[1]], p)
        x += p.shape[1] - overlap
    return canvas.astype(np.uint8)


def _pick(mnist, digit: int, nth: int = 0) -> np.ndarray:
    index = (mnist.test_labels == digit).nonzero().flatten()[nth]
    return mnist.test_images[index].numpy()


def test_split_separate_digits_left_to_right(mnist, mlp_checkpoint):
    from mnistrec.checkpoint import load_checkpoint
    from mnistrec.predict import predict_tensors

    model = load_checkpoint(mlp_checkpoint).model
    digits = [_pick(mnist, d) for d in (3, 7, 2)]
    number = 255 - np.pad(_paste(digits), 10)  # dark on light, like a user's picture
    tensors = split_digits(number)
    assert len(tensors) == 3
    assert "".join(str(r["digit"]) for r in predict_tensors(model, torch.stack(tensors))) == "372"


def test_split_touching_digits(mnist, mlp_checkpoint):
    from mnistrec.checkpoint import load_checkpoint
    from mnistrec.predict import predict_tensors

    model = load_checkpoint(mlp_checkpoint).model
    touching = _paste([_pick(mnist, 4), _pick(mnist, 0)], overlap=6)
    labels, count = ndi.label(touching > 0, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel())[1:]
    assert (sizes > 20).sum() == 1  # the two digits really form one connected blob
    tensors = split_digits(np.pad(touching, 8))
    assert len(tensors) == 2
    assert "".join(str(r["digit"]) for r in predict_tensors(model, torch.stack(tensors))) == "40"


def test_split_merges_pieces_of_one_digit():
    # A "5" drawn with a detached top bar: two components, one digit.
    five = np.zeros((60, 40), np.uint8)
    five[5:10, 8:34] = 255   # the bar, not touching the rest
    five[14:32, 8:13] = 255  # the stem
    five[30:35, 8:30] = 255
    five[30:52, 28:33] = 255
    five[50:55, 8:33] = 255
    assert ndi.label(five)[1] == 2
    assert len(split_digits(np.pad(five, 10))) == 1
    # And two "1"s side by side stay two digits.
    ones = np.zeros((60, 60), np.uint8)
    ones[5:55, 10:15] = 255
    ones[5:55, 40:45] = 255
    assert len(split_digits(ones)) == 2
