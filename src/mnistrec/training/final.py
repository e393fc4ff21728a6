"""``--final``: choose the epoch count on a validation split, then retrain on every training image."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

from ..data import MNIST
from ..errors import MnistrecError
from .config import TrainConfig
from .loop import train
from .rundir import completed
from .state import TrainResult


def resume_or_train(config: TrainConfig, data: MNIST, run_dir: Path | None, resume: bool, progress: bool,
                    log: Callable[[str], None], evaluate_test: bool, ddp: bool = True,
                    calibration: dict[str, Any] | None = None) -> TrainResult:
    """Train, continuing from ``run_dir/last.pth`` when resuming and it exists (``ddp``: see :func:`train`)."""
    resumable = resume and run_dir is not None and (run_dir / "last.pth").is_file()
    return train(config, data, run_dir, resume=resumable, progress=progress, log=log, evaluate_test=evaluate_test,
                 ddp=ddp, calibration=calibration)


def train_final(
    config: TrainConfig,
    data: MNIST,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    evaluate_test: bool = True,
    ddp: bool = True,
) -> TrainResult:
    """``--final``: choose the epoch count on the validation split, then retrain on all training images.

    The selection run (``RUN_DIR/selection``) trains with ``val_size`` held out
    and never sees the test set; its best validation epoch (with early
    stopping, if set) becomes the epoch count of the final run, which trains on
    every training image with the same recipe and is the one tested, once.

    The final run has no unseen training image to fit a temperature on, so it
    takes the selection run's (same recipe and epochs; fitted on its validation
    split), recorded with ``copied_from``; docs/calibration.md measures the transfer.
    """
    if config.val_size == 0:
        raise MnistrecError("--final needs a validation split to choose the epoch count (--val-size > 0)")
    run_dir = Path(run_dir) if run_dir else None
    selection_dir = run_dir / "selection" if run_dir else None
    if resume and completed(selection_dir):
        summary = json.loads((selection_dir / "metrics.json").read_text())
        best_epoch, calibration = int(summary["best_epoch"]), summary.get("calibration")
    else:
        log("selection run: choosing the epoch count on the validation split")
        selection = resume_or_train(config, data, selection_dir, resume, progress, log, evaluate_test=False, ddp=ddp)
        best_epoch, calibration = selection.best_epoch, selection.calibration
    if calibration:
        calibration = {**calibration, "copied_from": "selection run (RUN_DIR/selection)"}
    final_config = dataclasses.replace(config, val_size=0, epochs=best_epoch, early_stop=0, epoch_test=False)
    log(f"final run: {best_epoch} epochs (the best validation epoch) on all {_train_count(data, config)} training images")
    return resume_or_train(final_config, data, run_dir, resume, progress, log, evaluate_test, ddp, calibration)


def _train_count(data: MNIST, config: TrainConfig) -> int:
    return min(len(data.train_labels), config.limit_train or len(data.train_labels))
