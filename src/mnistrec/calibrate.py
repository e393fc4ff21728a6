"""``mnistrec calibrate``: fit a checkpoint's temperature on held-out training images and store it.

Where the temperature of each kind of model comes from (never the test set):

* a run trained with ``--val-size N``: its own validation split, fitted at the end
  of training or later with ``mnistrec calibrate CKPT`` (which reads N and the
  split seed from the checkpoint's recorded config, so it holds out the same images);
* a run trained on all 60,000 images (the recipes' default, ``--final``): it has
  no unseen training image, so it takes the temperature of a model of the same
  recipe that was trained with a validation split (``--from SELECTION.pth``,
  e.g. ``RUN_DIR/selection/model.pth`` of a ``--final`` run). Temperatures of the
  same recipe and epoch count agree closely across seeds and splits (measured in
  docs/calibration.md), which is what makes the transfer sound;
* ``--allow-seen`` fits on images the model was trained on anyway. Such a
  temperature is biased (the model is surer and more often right on images it
  has seen, so the fitted ``T`` comes out too low: over-confident on new images);
  it is refused unless asked for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .calibration import calibration_record
from .checkpoint import load_checkpoint, with_calibration
from .errors import MnistrecError


def held_out_split(meta: dict[str, Any], val_size: int | None, split_seed: int | None,
                   allow_seen: bool) -> tuple[int, int, bool]:
    """``(val_size, split_seed, seen)`` to calibrate on: the checkpoint's own split unless overridden.

    ``seen`` is true when the model was trained on (some of) those images; then
    ``allow_seen`` must be set, else this raises with one line saying what to do.
    """
    config = meta.get("config") or {}
    trained_val, trained_seed = int(config.get("val_size") or 0), int(config.get("split_seed") or 0)
    val_size = trained_val if val_size is None else val_size
    split_seed = trained_seed if split_seed is None else split_seed
    if val_size <= 0:
        raise MnistrecError("this checkpoint was trained on every training image, so none is held out: pass --from "
                            "a checkpoint of the same recipe trained with --val-size (its temperature is copied), or "
                            "--val-size N --allow-seen (biased: over-confident)")
    # The same split seed and a held-out part no larger than the one trained without: all unseen.
    unseen = trained_val > 0 and split_seed == trained_seed and val_size <= trained_val and not config.get("limit_train")
    if not unseen and not allow_seen:
        raise MnistrecError(f"the model was trained on some of these {val_size} images (it held out {trained_val} with "
                            f"split seed {trained_seed}); a temperature fitted on them is biased. Use its own split, "
                            "--from another checkpoint, or --allow-seen")
    return val_size, split_seed, not unseen


def validation_logits(loaded, data_dir: str | os.PathLike | None, val_size: int,
                      split_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uncalibrated logits and labels of the ``val_size`` held-out training images (split seed ``split_seed``)."""
    from .data import load_split, validation_indices
    from .evaluate import predict_logits

    images, labels = load_split("train", data_dir)
    if val_size >= len(images):
        raise MnistrecError(f"--val-size {val_size} must be smaller than the {len(images)} training images")
    _, val_idx = validation_indices(len(images), val_size, split_seed)
    return predict_logits(loaded.model, images[val_idx]), labels[val_idx]


def calibrate_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None,
                         data_dir: str | os.PathLike | None = None, val_size: int | None = None,
                         split_seed: int | None = None, allow_seen: bool = False,
                         source: str | os.PathLike | None = None) -> dict[str, Any]:
    """Fit (or with ``source``, copy) the temperature of ``checkpoint`` and write it to ``out`` (default: in place).

    Returns the calibration record written into the checkpoint.
    """
    checkpoint = Path(checkpoint)
    loaded = load_checkpoint(checkpoint)
    if source is not None:
        donor = load_checkpoint(source)
        record = donor.meta.get("calibration")
        if not record:
            raise MnistrecError(f"{source} has no calibration to copy; calibrate it first")
        if donor.model_name != loaded.model_name or (donor.meta.get("recipe") != loaded.meta.get("recipe")):
            raise MnistrecError(f"{source} is a {donor.meta.get('recipe')}/{donor.model_name} model, {checkpoint} a "
                                f"{loaded.meta.get('recipe')}/{loaded.model_name} one: a temperature only transfers "
                                "within a recipe")
        record = {**record, "copied_from": str(Path(source).name)}
    else:
        val_size, split_seed, seen = held_out_split(loaded.meta, val_size, split_seed, allow_seen)
        logits, labels = validation_logits(loaded, data_dir, val_size, split_seed)
        what = f"validation split: {val_size} training images, split_seed {split_seed}"
        record = calibration_record(logits, labels, what + (" (SEEN in training: biased)" if seen else ""))
    with_calibration(checkpoint, record, out or checkpoint)
    return record


def describe(record: dict[str, Any]) -> str:
    """One line for the CLI."""
    line = f"temperature {record['temperature']:.4f} ({record['fitted_on']}"
    line += f", copied from {record['copied_from']})" if "copied_from" in record else ")"
    before, after = record.get("val_before"), record.get("val_after")
    if before and after:
        line += (f"; validation ECE {100 * before['ece']:.2f}% -> {100 * after['ece']:.2f}%, "
                 f"NLL {before['nll']:.4f} -> {after['nll']:.4f}")
    return line

