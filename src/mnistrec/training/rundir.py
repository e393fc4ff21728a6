"""The run directory: what a run writes, how it is found again to resume, and the copy of its model.

``RUN_DIR`` holds ``model.pth``, ``metrics.json``, ``history.csv`` (:func:`write_run`),
``last.pth`` (the training state, see :mod:`mnistrec.training.state`) and, for
ensembles and ``--final`` runs, ``run.json`` (:func:`write_run_options`) and
sub-folders ``memberI`` / ``selection`` that are run directories themselves.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..checkpoint import library_versions, read_checkpoint, save_checkpoint
from ..data import MNIST
from ..errors import CheckpointError, MnistrecError
from ..fileio import atomic_write, atomic_write_text
from .config import TrainConfig, make_config
from .state import TrainResult


def prepare_run_dir(run_dir: str | Path | None) -> Path | None:
    """Create ``run_dir`` and make sure it takes files: fail now, not after the first epoch."""
    run_dir = Path(run_dir) if run_dir else None
    if run_dir:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=run_dir).close()
        except OSError as exc:
            raise MnistrecError(f"cannot write to run directory {run_dir}: {exc.strerror or exc}") from None
    return run_dir


RUN_OPTIONS = "run.json"


def write_run_options(run_dir: str | Path, config: TrainConfig, final: bool = False) -> None:
    """Record how a run was started in ``RUN_DIR/run.json``.

    Ensembles and ``--final`` runs keep their training state in sub-folders
    (``memberI``, ``selection``), so ``last.pth`` at the top may not exist yet;
    this file lets ``mnistrec train --resume RUN_DIR`` find their options anyway.
    """
    payload = {"config": config.to_dict(), "final": bool(final)}
    atomic_write_text(Path(run_dir) / RUN_OPTIONS, json.dumps(payload, indent=2))


def resume_options(run_dir: str | Path, **overrides: Any) -> tuple[TrainConfig, bool]:
    """The config a run in ``run_dir`` was started with, and whether it was a ``--final`` run.

    Read from ``last.pth`` when there is one (it is the state actually being
    trained), else from ``run.json`` (an ensemble or a ``--final`` run still in a
    sub-folder), so that ``mnistrec train --resume RUN_DIR`` needs no other flag.
    Non-``None`` ``overrides`` replace saved values; :func:`train` then refuses
    any that change the weights (all but ``device``).
    """
    state_path = Path(run_dir) / "last.pth"
    options_path = Path(run_dir) / RUN_OPTIONS
    final = False
    if state_path.is_file():
        source, saved = state_path, read_checkpoint(state_path).get("config")
    elif options_path.is_file():
        try:
            stored = json.loads(options_path.read_text())
            saved, final = stored["config"], bool(stored.get("final"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise MnistrecError(f"{options_path}: unreadable run options ({exc})") from None
        source = options_path
    else:
        raise MnistrecError(f"nothing to resume: {state_path} does not exist")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    if not isinstance(saved, dict) or not set(saved) <= known or "recipe" not in saved:
        raise CheckpointError(f"{source}: holds no training options; not an mnistrec training state")
    recipe = overrides.pop("recipe", None) or saved["recipe"]
    # An option newer than the saved run had its plain default's behaviour then, whatever the recipe says now
    # (a `best` run saved before `precision` existed trained in float32, not the recipe's "auto").
    values = {k: v for k, v in {**TrainConfig().to_dict(), **saved}.items() if k != "recipe"}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return make_config(recipe, **values), final


def resume_config(run_dir: str | Path, **overrides: Any) -> TrainConfig:
    """The config of the run in ``run_dir``; see :func:`resume_options`."""
    return resume_options(run_dir, **overrides)[0]


def completed(run_dir: Path | None) -> bool:
    """The run in ``run_dir`` finished: its model and metrics are written."""
    return run_dir is not None and (run_dir / "metrics.json").is_file() and (run_dir / "model.pth").is_file()


def write_run(result: TrainResult, data: MNIST) -> None:
    """``model.pth``, ``metrics.json`` and ``history.csv`` in the run directory."""
    run_dir = result.run_dir
    assert run_dir is not None
    summary = {
        "recipe": result.config.recipe,
        "model": result.config.model,
        "config": result.config.to_dict(),
        "test": result.metrics or None,  # None: the test set was not evaluated (selection run, member)
        "final_train_accuracy": result.history[-1]["train_accuracy"] if result.history else None,
        "best_epoch": result.best_epoch,
        "best_val_accuracy": next((r["val_accuracy"] for r in result.history if r["epoch"] == result.best_epoch), None),
        "stopped_early": result.stopped_early,
        "seconds": round(result.seconds, 3),
        "autocast": result.autocast,  # what --precision (and the device) made of the training steps
        "versions": library_versions(),
        "data_checksums": data.checksums(),
        "calibration": result.calibration,
    }
    save_checkpoint(
        run_dir / "model.pth",
        result.config.model,
        result.config.model_kwargs,
        result.model,
        recipe=result.config.recipe,
        config=result.config.to_dict(),
        metrics={k: v for k, v in result.metrics.items() if k in ("loss", "accuracy", "count", "errors", "ece", "nll")},
        data_checksums=data.checksums(),
        history=result.history,
        **({"calibration": result.calibration} if result.calibration else {}),
    )
    atomic_write_text(run_dir / "metrics.json", json.dumps(summary, indent=2))
    columns = list(dict.fromkeys(key for row in result.history for key in row))

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(result.history)
    atomic_write_text(run_dir / "history.csv", text.getvalue())


def copy_model(run_dir: Path, destination: str | Path) -> None:
    """Copy the run's ``model.pth`` to ``destination`` (``mnist_model.pth`` by default), atomically."""
    source = Path(run_dir) / "model.pth"

    def write(fh) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, fh)

    atomic_write(destination, write)
