"""The training loop, named recipes and the run directory.

Speed comes from keeping the whole data set in memory as one float tensor and
slicing shuffled batches out of it: no per-sample ``Dataset``, no PIL, no
DataLoader workers. A recipe is a plain dict of :class:`TrainConfig` values;
command-line flags override single values.

Resumability: after every epoch the full training state (weights, optimiser,
scheduler, EMA, every RNG, history) is written atomically to ``RUN_DIR/last.pth``.
``resume=True`` restarts from there and replays the exact same data order, so an
interrupted run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .checkpoint import atomic_write, checkpoint_dict, library_versions, read_checkpoint, save_checkpoint
from .data import MNIST, to_float
from .errors import MnistrecError
from .evaluate import evaluate
from .models import create_model


@dataclass
class TrainConfig:
    """Every knob of a training run. Recipes set these; flags override them."""

    recipe: str = "seed"
    model: str = "mlp"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 5
    batch_size: int = 64
    optimizer: str = "adam"  # adam | adamw | sgd (Nesterov momentum)
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "none"  # none | onecycle | cosine  (stepped per batch)
    label_smoothing: float = 0.0
    ema_decay: float = 0.0  # 0 disables the weight EMA
    augment: str = "none"  # an augmentation preset name from mnistrec.augment
    val_size: int = 0  # held out from the training set; selection uses it, never the test set
    split_seed: int = 0  # the validation split is the same for every training seed
    seed: int = 42
    device: str = "auto"
    eval_batch_size: int = 1000
    limit_train: int | None = None
    limit_test: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The seed recipe is the original notebook exactly: MLP, Adam 1e-3, batch 64, 5 epochs.
RECIPES: dict[str, dict[str, Any]] = {
    "seed": {},
}


def recipe_names() -> list[str]:
    return list(RECIPES)


def make_config(recipe: str = "seed", **overrides: Any) -> TrainConfig:
    """The named recipe's config with ``overrides`` applied (``None`` values are ignored)."""
    if recipe not in RECIPES:
        raise MnistrecError(f"unknown recipe {recipe!r}; choose from: {', '.join(recipe_names())}")
    values = {**RECIPES[recipe], "recipe": recipe}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in overrides.items():
        if key not in known:
            raise MnistrecError(f"unknown training option {key!r}")
        if value is not None:
            values[key] = value
    config = TrainConfig(**values)
    _validate(config)
    return config


def _validate(c: TrainConfig) -> None:
    checks = [
        (c.epochs >= 1, f"--epochs must be at least 1 (got {c.epochs})"),
        (c.batch_size >= 1, f"--batch-size must be at least 1 (got {c.batch_size})"),
        (c.lr > 0 and math.isfinite(c.lr), f"--lr must be a positive number (got {c.lr})"),
        (c.val_size >= 0, f"--val-size must be >= 0 (got {c.val_size})"),
        (c.optimizer in ("adam", "adamw", "sgd"), f"unknown optimizer {c.optimizer!r}; choose from: adam, adamw, sgd"),
        (c.schedule in ("none", "onecycle", "cosine"), f"unknown schedule {c.schedule!r}; choose from: none, onecycle, cosine"),
        (0 <= c.ema_decay < 1, f"EMA decay must be in [0, 1) (got {c.ema_decay})"),
        (0 <= c.label_smoothing < 1, f"label smoothing must be in [0, 1) (got {c.label_smoothing})"),
    ]
    for ok, message in checks:
        if not ok:
            raise MnistrecError(message)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise MnistrecError(f"unknown device {name!r}; choose from: auto, cpu, cuda, mps")
    if name == "cuda" and not torch.cuda.is_available():
        raise MnistrecError("--device cuda requested but PyTorch sees no CUDA device")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise MnistrecError("--device mps requested but this PyTorch build has no MPS device")
    return torch.device(name)


class NonFiniteLoss(MnistrecError):
    """Training produced a NaN or infinite loss."""


@dataclass
class Split:
    """Tensors a run trains and selects on: float images ``[N, 1, 28, 28]`` and labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor | None
    val_y: torch.Tensor | None


def split_data(data: MNIST, config: TrainConfig) -> Split:
    """Hold out ``val_size`` training examples with a seed independent of the training seed."""
    images, labels = data.train_images, data.train_labels
    if config.limit_train:
        images, labels = images[: config.limit_train], labels[: config.limit_train]
    if config.val_size >= len(images):
        raise MnistrecError(f"--val-size {config.val_size} leaves no training data (only {len(images)} examples)")
    if config.val_size:
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(config.split_seed))
        val_idx, train_idx = order[: config.val_size], order[config.val_size :]
        return Split(to_float(images[train_idx]), labels[train_idx], to_float(images[val_idx]), labels[val_idx])
    return Split(to_float(images), labels, None, None)


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    # Weight decay on BatchNorm/bias parameters only hurts; apply it to weight matrices and kernels.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "adam":
        # foreach: one fused update per step instead of a Python loop over tensors (~10% faster here).
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, foreach=True)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True, foreach=True)


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    total = config.epochs * steps_per_epoch
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total, pct_start=0.25)
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return None


def _augmenter(config: TrainConfig) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None:
    if config.augment == "none":
        return None
    from . import augment

    return augment.get_augmentation(config.augment)


@dataclass
class TrainResult:
    model: nn.Module
    config: TrainConfig
    history: list[dict[str, float]]
    metrics: dict[str, Any]
    run_dir: Path | None
    seconds: float


def _rng_state(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    state.update({name: g.get_state() for name, g in generators.items()})
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    for name, g in generators.items():
        g.set_state(state[name])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(
    config: TrainConfig,
    data: MNIST,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train ``config`` on ``data``; write checkpoints, metrics and history into ``run_dir``.

    Returns the trained model (eval mode; the EMA weights when EMA is on) with
    its per-epoch history and final test metrics. The test set is evaluated every
    epoch only when there is no validation split (the seed's behaviour);
    otherwise it is evaluated once, at the end.

    Under torchrun this runs DistributedDataParallel (see :mod:`mnistrec.distributed`):
    ``config.batch_size`` is the *global* batch, each rank trains on its shard, and
    only rank 0 logs and writes files. Every rank evaluates the same full split with
    the same weights, so all ranks agree on the metrics without communicating.
    """
    from tqdm.auto import tqdm

    start_time = time.perf_counter()
    ctx = distributed.setup(resolve_device(config.device))
    device = ctx.device
    local_batch = ctx.per_rank_batch(config.batch_size)
    if not ctx.is_main:  # rank 0 alone logs and writes files; the others still read last.pth to resume
        log, progress = (lambda _: None), False
    run_dir = Path(run_dir) if run_dir else None
    if run_dir:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MnistrecError(f"cannot create run directory {run_dir}: {exc.strerror or exc}") from None

    torch.manual_seed(config.seed)
    shuffle_gen = torch.Generator().manual_seed(config.seed)
    augment_gen = torch.Generator().manual_seed(config.seed + 1)
    generators = {"shuffle": shuffle_gen, "augment": augment_gen}

    split = split_data(data, config)
    train_x, train_y = split.train_x.to(device), split.train_y.to(device)
    test_x = data.test_images[: config.limit_test] if config.limit_test else data.test_images
    test_y = data.test_labels[: config.limit_test] if config.limit_test else data.test_labels
    n = len(train_x)
    n_local = len(ctx.shard(torch.arange(n)))  # examples this rank sees per epoch (n when not distributed)
    steps_per_epoch = math.ceil(n_local / local_batch)

    model = create_model(config.model, **config.model_kwargs).to(device)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch)
    ema = None
    if config.ema_decay:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config.ema_decay), use_buffers=True
        )
    augmenter = _augmenter(config)
    train_model = ctx.wrap(model)  # DDP averages the gradients over the ranks
    history: list[dict[str, float]] = []
    first_epoch = 0

    state_path = run_dir / "last.pth" if run_dir else None
    if resume:
        if state_path is None or not state_path.is_file():
            raise MnistrecError(f"nothing to resume: {state_path or 'no run directory'} does not exist")
        state = read_checkpoint(state_path)
        if state.get("config") != _comparable(config):
            raise MnistrecError(f"{state_path}: the run was started with different options; resume with the same ones")
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        _set_rng_state(state["rng"], generators)
        history = list(state["history"])
        first_epoch = int(state["epoch"])
        log(f"resuming {run_dir} after epoch {first_epoch}/{config.epochs}")

    def save_state(epoch: int) -> None:
        if state_path is None or not ctx.is_main:
            return
        payload = checkpoint_dict(
            config.model,
            config.model_kwargs,
            model,
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict() if scheduler is not None else None,
            ema=ema.state_dict() if ema is not None else None,
            rng=_rng_state(generators),
            epoch=epoch,
            history=history,
            config=_comparable(config),
        )
        atomic_write(state_path, lambda fh: torch.save(payload, fh))

    show_bar = progress
    try:
        for epoch in range(first_epoch, config.epochs):
            model.train()
            order = ctx.shard(torch.randperm(n, generator=shuffle_gen)).to(device)
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            correct = torch.zeros((), device=device, dtype=torch.int64)
            bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not show_bar, leave=False, unit="batch")
            for step in bar:
                idx = order[step * local_batch : (step + 1) * local_batch]
                x, y = train_x[idx], train_y[idx]
                if augmenter is not None:
                    x = augmenter(x, augment_gen)
                logits = train_model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
                if not torch.isfinite(loss):
                    lr_now = optimizer.param_groups[0]["lr"]
                    raise NonFiniteLoss(
                        f"loss became {float(loss)} at epoch {epoch + 1}, step {step + 1} with learning rate {lr_now:.3g}; "
                        f"lower --lr{' (the last good checkpoint is ' + str(state_path) + ')' if state_path and state_path.exists() else ''}"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                if ema is not None:
                    ema.update_parameters(model)
                loss_sum += loss.detach() * len(y)
                correct += (logits.argmax(1) == y).sum()
            seen = torch.tensor(n_local, device=device, dtype=torch.float64)
            ctx.all_reduce_sum(loss_sum, correct, seen)  # training metrics over all ranks' examples
            row = {"epoch": epoch + 1, "train_loss": float(loss_sum / seen), "train_accuracy": float(correct / seen),
                   "lr": optimizer.param_groups[0]["lr"]}
            eval_model = ema.module if ema is not None else model
            if split.val_x is not None:
                val = evaluate(eval_model, split.val_x, split.val_y, config.eval_batch_size, device)
                row.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
            else:
                test = evaluate(eval_model, test_x, test_y, config.eval_batch_size, device)
                row.update(test_loss=test["loss"], test_accuracy=test["accuracy"])
            row["seconds"] = time.perf_counter() - start_time
            history.append(row)
            log(format_epoch(row, config.epochs))
            save_state(epoch + 1)
    except KeyboardInterrupt:
        if state_path is not None and state_path.exists():
            log(f"\ninterrupted; the last completed epoch is saved. Resume with: mnistrec train --resume {run_dir}")
        else:
            log("\ninterrupted before the first epoch finished; nothing to resume")
        raise

    final_model = ema.module if ema is not None else model
    final_model.eval()
    metrics = evaluate(final_model, test_x, test_y, config.eval_batch_size, device)
    seconds = time.perf_counter() - start_time
    result = TrainResult(final_model, config, history, metrics, run_dir, seconds)
    if run_dir and ctx.is_main:
        write_run(result, data)
    return result


def _comparable(config: TrainConfig) -> dict[str, Any]:
    # Everything but the device decides the weights; a run may resume on another device.
    values = config.to_dict()
    values.pop("device")
    return values


def format_epoch(row: dict[str, float], epochs: int) -> str:
    """The seed's per-epoch line."""
    text = (f"Epoch {row['epoch']}/{epochs}, Train Loss: {row['train_loss']:.4f}, "
            f"Train Acc: {100 * row['train_accuracy']:.2f}%")
    if "val_loss" in row:
        text += f", Val Loss: {row['val_loss']:.4f}, Val Acc: {100 * row['val_accuracy']:.2f}%"
    if "test_loss" in row:
        text += f", Test Loss: {row['test_loss']:.4f}, Test Acc: {100 * row['test_accuracy']:.2f}%"
    return text


def write_run(result: TrainResult, data: MNIST) -> None:
    """``model.pth``, ``metrics.json`` and ``history.csv`` in the run directory."""
    run_dir = result.run_dir
    assert run_dir is not None
    summary = {
        "recipe": result.config.recipe,
        "model": result.config.model,
        "config": result.config.to_dict(),
        "test": result.metrics,
        "final_train_accuracy": result.history[-1]["train_accuracy"] if result.history else None,
        "seconds": round(result.seconds, 3),
        "versions": library_versions(),
        "data_checksums": data.checksums(),
    }
    save_checkpoint(
        run_dir / "model.pth",
        result.config.model,
        result.config.model_kwargs,
        result.model,
        recipe=result.config.recipe,
        config=result.config.to_dict(),
        metrics={k: v for k, v in result.metrics.items() if k in ("loss", "accuracy", "count", "errors")},
        data_checksums=data.checksums(),
        history=result.history,
    )
    atomic_write(run_dir / "metrics.json", lambda fh: fh.write(json.dumps(summary, indent=2).encode()))
    columns = list(dict.fromkeys(key for row in result.history for key in row))

    def write_csv(fh) -> None:
        import io

        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        writer.writerows(result.history)
        fh.write(text.getvalue().encode())

    atomic_write(run_dir / "history.csv", write_csv)


def copy_model(run_dir: Path, destination: str | Path) -> None:
    """Copy the run's ``model.pth`` to ``destination`` (``mnist_model.pth`` by default), atomically."""
    source = Path(run_dir) / "model.pth"

    def write(fh) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, fh)

    atomic_write(destination, write)
