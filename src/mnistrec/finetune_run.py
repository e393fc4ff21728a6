"""``mnistrec finetune``: a run directory around :mod:`mnistrec.finetune`, with provenance, calibration and resume.

``RUN_DIR/finetune.json`` holds the options (so ``--resume RUN_DIR`` needs
nothing else), ``RUN_DIR/last.pth`` the state every ``SAVE_EVERY`` steps and on
Ctrl-C, ``RUN_DIR/model.pth`` the result: an ordinary checkpoint (``predict``,
``serve``, ``export`` take it) whose ``finetune`` record names the base model
(path and SHA-256) and every image it learnt from (path, SHA-256, label), with
MNIST test accuracy before and after.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import CheckpointError, MnistrecError
from .fileio import file_sha256
from .finetune import FinetuneConfig, Finetuner
from .interrupt import StopRequest

OPTIONS = "finetune.json"
SAVE_EVERY = 50
#: Hold out a part of the user's images to refit the temperature only when every digit present has this many.
HOLDOUT_MIN_PER_DIGIT = 20
HOLDOUT_FRACTION = 0.2


@dataclass
class FinetuneResult:
    model_path: Path
    record: dict[str, Any]
    seconds: float


def holdout_split(labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_idx, held_idx)``: 20% of every digit held out when each digit present has >= 20 images, else none."""
    counts = torch.bincount(labels, minlength=10)
    present = counts[counts > 0]
    everything = torch.arange(len(labels))
    if len(present) == 0 or int(present.min()) < HOLDOUT_MIN_PER_DIGIT:
        return everything, everything[:0]
    g = torch.Generator().manual_seed(seed)
    held = []
    for digit in torch.nonzero(counts).flatten().tolist():
        idx = torch.nonzero(labels == digit).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        held.append(idx[: round(len(idx) * HOLDOUT_FRACTION)])
    held_idx = torch.cat(held).sort().values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held_idx] = False
    return everything[mask], held_idx


def write_options(run_dir: Path, options: dict[str, Any]) -> None:
    from .fileio import atomic_write_text

    atomic_write_text(run_dir / OPTIONS, json.dumps(options, indent=2))


def read_options(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / OPTIONS
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MnistrecError(f"nothing to resume: {path} does not exist (not a fine-tuning run directory)") from None
    except (OSError, ValueError) as exc:
        raise MnistrecError(f"{path}: unreadable options ({exc})") from None


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    from .evaluate import predict_logits

    return float((predict_logits(model, x).argmax(1) == y).double().mean()) if len(y) else float("nan")


def run_finetune(checkpoint: str | os.PathLike, images: str | os.PathLike, run_dir: str | os.PathLike,
                 config: FinetuneConfig, data_dir: str | os.PathLike | None = None, resume: bool = False,
                 progress: bool = True, log: Callable[[str], None] = print) -> FinetuneResult:
    """Fine-tune ``checkpoint`` on the labelled images ``images`` into ``run_dir/model.pth``; see the module docstring."""
    from tqdm.auto import tqdm

    from .checkpoint import load_checkpoint
    from .data import load_split
    from .folders import load_labelled_images

    start = time.perf_counter()
    run_dir = Path(run_dir)
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    base = load_checkpoint(checkpoint)
    base_sha = file_sha256(Path(checkpoint))
    data = load_labelled_images(images, on_skip=lambda path, why: log(f"mnistrec: skipped {path}: {why}"))
    per_digit = data.counts()
    log(f"images: {len(data)} from {images} (per digit 0-9: {' '.join(map(str, per_digit))})"
        + (f"; {len(data.skipped)} unreadable file(s) skipped" if data.skipped else ""))
    train_idx, held_idx = holdout_split(data.labels, config.seed)
    options = {"checkpoint": str(Path(checkpoint).resolve()), "checkpoint_sha256": base_sha,
               "images": str(Path(images).resolve()), "images_sha256": data.digest(), "config": config.to_dict()}
    state_path = run_dir / "last.pth"
    if resume:
        saved = read_options(run_dir)
        if saved != options:
            changed = sorted(k for k in options if saved.get(k) != options[k])
            raise MnistrecError(f"cannot resume {run_dir}: {', '.join(changed)} changed since it started")
    else:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MnistrecError(f"cannot create run directory {run_dir}: {exc.strerror or exc}") from None
        write_options(run_dir, options)

    train_x, train_y = load_split("train", data_dir)
    test_x, test_y = load_split("test", data_dir)
    model = base.model
    label_smoothing = float((base.meta.get("config") or {}).get("label_smoothing") or 0.0)
    tuner = Finetuner(model, config, data.images[train_idx], data.labels[train_idx], train_x, train_y, label_smoothing)
    before = {"mnist_test_accuracy": _accuracy(model, test_x, test_y),
              "held_out_accuracy": _accuracy(model, data.images[held_idx], data.labels[held_idx])}
    if resume:
        _restore(state_path, model, tuner)
        log(f"resuming {run_dir} at step {tuner.done}/{config.steps}")
    log(f"base: {checkpoint} ({base.model_name}); MNIST test accuracy {100 * before['mnist_test_accuracy']:.2f}%")

    saved_at = tuner.done
    stop = StopRequest(enabled=True)  # the same Ctrl-C handling as `train`: save at a step boundary
    bar = tqdm(total=config.steps, initial=tuner.done, desc="fine-tune", unit="step", disable=not progress, leave=False)
    try:
        with stop:
            while tuner.done < config.steps:
                if stop.requested:
                    raise KeyboardInterrupt
                loss = tuner.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                if tuner.done % SAVE_EVERY == 0 and tuner.done < config.steps:
                    _save(state_path, base, model, tuner)
                    saved_at = tuner.done
    except KeyboardInterrupt:
        bar.close()
        if tuner.done > saved_at:
            _save(state_path, base, model, tuner)
            saved_at = tuner.done
        log(f"\ninterrupted at step {saved_at}/{config.steps}; resume with: mnistrec finetune --resume {run_dir}"
            if state_path.exists() else "\ninterrupted before anything was saved")
        raise
    bar.close()
    model.eval()
    return _finish(run_dir, base, model, data, held_idx, before, options, config, start, test_x, test_y, log)


def _save(path: Path, base, model: torch.nn.Module, tuner: Finetuner) -> None:
    from .checkpoint import checkpoint_dict
    from .fileio import atomic_write

    payload = checkpoint_dict(base.model_name, base.model_kwargs, model, finetune_state=tuner.state())
    atomic_write(path, lambda fh: torch.save(payload, fh))


def _restore(path: Path, model: torch.nn.Module, tuner: Finetuner) -> None:
    from .checkpoint import read_checkpoint

    if not path.is_file():
        raise MnistrecError(f"nothing to resume: {path} does not exist (the run was stopped before step {SAVE_EVERY}?)")
    state = read_checkpoint(path)
    try:
        model.load_state_dict(state["state_dict"])
        tuner.load_state(state["finetune_state"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a complete fine-tuning state ({type(exc).__name__}: {str(exc)[:120]})") from None


def _calibration(base, model: torch.nn.Module, data, held_idx: torch.Tensor, log: Callable[[str], None]) -> dict | None:
    """A temperature refitted on the held-out images when there are any, else the base model's (said so)."""
    from .calibration import calibration_record
    from .evaluate import predict_logits

    if len(held_idx):
        record = calibration_record(predict_logits(model, data.images[held_idx]), data.labels[held_idx],
                                    f"held-out part of {data.source}: {len(held_idx)} images never trained on")
        log(f"temperature: refitted on {len(held_idx)} held-out images of yours: {record['temperature']:.4f}")
        return record
    kept = base.meta.get("calibration")
    reason = f"fewer than {HOLDOUT_MIN_PER_DIGIT} images of some digit, so none were held out to refit it"
    if kept:
        log(f"temperature: kept the base model's ({float(kept['temperature']):.4f}): {reason}")
        return {**kept, "kept_from_base": reason}
    log(f"temperature: none (the base model has none, and {reason})")
    return None


def _finish(run_dir: Path, base, model, data, held_idx, before, options, config, start, test_x, test_y, log) -> FinetuneResult:
    from .checkpoint import save_checkpoint

    after = {"mnist_test_accuracy": _accuracy(model, test_x, test_y),
             "held_out_accuracy": _accuracy(model, data.images[held_idx], data.labels[held_idx])}
    calibration = _calibration(base, model, data, held_idx, log)
    seconds = time.perf_counter() - start
    record = {
        "base": {"path": options["checkpoint"], "sha256": options["checkpoint_sha256"], "model": base.model_name,
                 "recipe": base.meta.get("recipe")},
        "images": data.provenance(),
        "held_out": len(held_idx),
        "config": config.to_dict(),
        "before": before,
        "after": after,
        "seconds": round(seconds, 2),
    }
    meta = {k: base.meta[k] for k in ("recipe", "config", "data_checksums") if k in base.meta}
    if calibration:
        meta["calibration"] = calibration
    path = run_dir / "model.pth"
    save_checkpoint(path, base.model_name, base.model_kwargs, model, finetune=record,
                    metrics={"accuracy": after["mnist_test_accuracy"], "count": len(test_y)}, **meta)
    from .fileio import atomic_write_text

    atomic_write_text(run_dir / "metrics.json", json.dumps({k: v for k, v in record.items() if k != "images"}
                                                          | {"images_sha256": data.digest()}, indent=2))
    log(f"MNIST test accuracy: {100 * before['mnist_test_accuracy']:.2f}% -> {100 * after['mnist_test_accuracy']:.2f}%")
    if len(held_idx):
        log(f"held-out images of yours ({len(held_idx)}): {100 * before['held_out_accuracy']:.1f}% -> "
            f"{100 * after['held_out_accuracy']:.1f}%")
    log(f"model: {path} ({seconds:.1f} s)")
    return FinetuneResult(path, record, seconds)
