"""Turn a user's picture into what an MNIST model expects: one function shared by the CLI, the API and the web app.

MNIST itself was made this way (LeCun et al.): the digit is cropped to its ink,
its longer side scaled to 20 pixels keeping the aspect ratio, anti-aliased, and
placed in a 28×28 field so that its centre of mass falls on the field's centre
(row 14, column 14 in 0-based pixel indices: the mean centre of mass of the MNIST
test set is (13.99, 14.00)). User pictures add what MNIST never had, and we undo
it first: EXIF rotation, transparency, dark ink on light paper, uneven lighting,
noise, very thin or very bold pens.

Pipeline (:func:`preprocess`)::

    open_image        decode, EXIF orientation, pixel cap       (PIL.Image)        imagefile.py
    to_grey           alpha composited onto a contrasting background, float [0, 1]  imagefile.py
    find_ink          polarity (auto|yes|no) -> ink bright; background flattened
                      by a morphological opening (uneven lighting); Otsu threshold;
                      specks removed -> soft ink in [0, 1] and its mask      ink.py
    to_field          crop to the ink's box; hairlines thickened to MNIST's pen width;
                      longer side -> 20 px (anti-aliased); 28×28 centred on the mass   field.py

Several digits (:func:`split_digits`, ``--multi``) live in segment.py. This
module is the one entry point the CLI, the API and the web app import.

A 28×28 array already in MNIST style (light ink on black) is *not* special-cased:
it goes through the same steps. Polarity detection keeps it as it is and, since
MNIST digits already fill a 20-px box centred on their mass, the result is close
to the input (the benchmark's ``mnist-as-is`` row measures how close in terms of
predictions).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .field import to_field
from .imagefile import MAX_PIXELS, WORK_SIZE, open_image
from .ink import INVERT_CHOICES, find_ink
from .segment import split_digits

__all__ = ["INVERT_CHOICES", "MAX_PIXELS", "WORK_SIZE", "open_image", "preprocess", "split_digits"]


def preprocess(image: Image.Image | np.ndarray, invert: str = "auto") -> torch.Tensor:
    """MNIST-style float32 ``[1, 28, 28]`` in [0, 1], ink = 1, from a PIL image or a numpy array.

    ``invert``: ``"auto"`` detects dark-on-light and inverts it, ``"yes"`` always
    inverts, ``"no"`` never. Arrays may be 2-D grey, HxWx1/3/4, of bool, integer
    (full range of the dtype; wide ints holding ≤ 255 read as 8-bit) or float
    (``[0, 1]``, or ``0..255`` when the maximum exceeds 1) type. Raises
    :class:`ImageError` ("no ink found …") for a blank image.
    """
    soft, mask = find_ink(image, invert)
    return to_field(soft, mask)
