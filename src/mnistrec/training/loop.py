"""The training loop: :func:`train` runs epochs of :func:`train_epoch`, scores each with :func:`score_epoch`.

Speed comes from keeping the whole data set in memory as one float tensor and
slicing shuffled batches out of it: no per-sample ``Dataset``, no PIL, no
DataLoader workers.

Resumability: after every epoch the full training state (weights, optimiser,
scheduler, EMA, every RNG, history; see :class:`~mnistrec.training.state.TrainingState`)
is written atomically to ``RUN_DIR/last.pth``. ``resume=True`` restarts from there
and replays the exact same data order, so an interrupted run ends with the same
weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..data import MNIST
from ..devices import autocast_dtype, channels_last_helps, resolve_device
from ..errors import MnistrecError
from ..interrupt import StopRequest
from ..calibration import calibrated, calibration_record
from ..evaluate import evaluate, predict_logits
from ..models import Normalize, create_model
from .config import TrainConfig
from .optim import augmenter
from .rundir import prepare_run_dir, write_run
from .split import Split, split_data, test_split
from .state import TrainingState, TrainResult


class NonFiniteLoss(MnistrecError):
    """Training produced a NaN or infinite loss."""


# The loss is checked for NaN/inf every this many steps (and at the end of an epoch and before a Ctrl-C save),
# not after every step: a check is a host sync, which stalls a GPU's queue every step.
FINITE_CHECK_STEPS = 64


@dataclass
class _Run:
    """What stays fixed while a run trains: its data on the device, batch geometry, and where it saves."""

    ctx: distributed.DistContext
    split: Split
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    local_batch: int
    n_local: int  # examples this rank sees per epoch (all of them when not distributed)
    steps_per_epoch: int
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None
    train_model: nn.Module  # the model, wrapped in DDP when distributed
    state_path: Path | None
    autocast: torch.dtype | None = None  # the dtype of the training steps' forward pass (devices.autocast_dtype)
    normalise: Normalize | None = None  # set when train_x was normalised once, up front, by this module
    saved_at: str | None = None  # the last point saved to state_path, for the Ctrl-C message
    last_test: dict[str, Any] | None = None  # test metrics of the epoch last scored in this process (seed style)

    @property
    def autocast_name(self) -> str | None:
        """``"bfloat16"`` or ``"float16"`` when the training steps run under autocast, else ``None``."""
        return str(self.autocast).removeprefix("torch.") if self.autocast is not None else None

    def save(self, state: TrainingState, partial: dict[str, Any] | None = None) -> None:
        """Write ``last.pth`` (rank 0 only; nothing without a run directory)."""
        if self.state_path is not None and self.ctx.is_main:
            state.save(self.state_path, partial)


def train(
    config: TrainConfig,
    data: MNIST,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    evaluate_test: bool = True,
    ddp: bool = True,
    calibration: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``config`` on ``data``; write checkpoints, metrics and history into ``run_dir``.

    Returns the trained model (eval mode; the EMA weights when EMA is on) with
    its per-epoch history and final test metrics. With a validation split the
    returned weights are those of the best validation epoch, and ``early_stop``
    ends the run after that many epochs without improvement. The test set is
    evaluated every epoch only for ``epoch_test`` with no validation split (the
    seed's behaviour); otherwise once, at the end, and not at all with
    ``evaluate_test=False`` (selection runs, ensemble members), calibrated (:func:`_fit_temperature`).

    Under torchrun this runs DistributedDataParallel (see :mod:`mnistrec.distributed`):
    ``config.batch_size`` is the *global* batch, each rank trains on its shard, and
    only rank 0 logs and writes files. Every rank evaluates the same full split with
    the same weights, so all ranks agree on the metrics without communicating.
    With ``ddp=False`` this process trains alone even under torchrun (an ensemble
    member: the ranks split the members, not the data) and writes its own run.
    """
    start_time = time.perf_counter()
    ctx = _process_context(config, ddp)
    local_batch = ctx.per_rank_batch(config.batch_size)  # a bad --batch-size fails before anything is written
    if not ctx.is_main:  # rank 0 alone logs and writes files; the others still read last.pth to resume
        log, progress = (lambda _: None), False
    run_dir = prepare_run_dir(run_dir)
    torch.manual_seed(config.seed)
    run, state = _start(config, data, ctx, local_batch, run_dir, log)
    if resume:
        if run.state_path is None or not run.state_path.is_file():
            raise MnistrecError(f"nothing to resume: {run.state_path or 'no run directory'} does not exist")
        state.restore(run.state_path)
        at = f", step {int(state.partial['step'])}/{run.steps_per_epoch} of epoch {state.epoch + 1}" if state.partial else ""
        log(f"resuming {run_dir} after epoch {state.epoch}/{config.epochs}{at}")

    # Ctrl-C only sets a flag; the loop saves at the next step boundary, where
    # weights, optimiser, scheduler, EMA and RNGs agree, so resuming stays bit-exact.
    # Under torchrun the ranks would see the flag at different steps and deadlock in
    # the gradient all-reduce, so there Ctrl-C interrupts at once (the last epoch is saved).
    stop = StopRequest(enabled=run.state_path is not None and not ctx.enabled)
    try:
        with stop:
            while state.epoch < config.epochs and not state.stopped_early:
                with _normalised_inputs(run.normalise):
                    row = train_epoch(state, run, stop, progress)
                score_epoch(state, run, row, evaluate_test)
                row["seconds"] = time.perf_counter() - start_time
                state.history.append(row)
                log(format_epoch(row, config.epochs))
                if state.stopped_early:
                    log(f"early stop: no better validation accuracy for {config.early_stop} epochs; "
                        f"keeping epoch {state.best.epoch} ({100 * state.best.val_accuracy:.2f}%)")
                state.epoch += 1
                run.save(state)
                run.saved_at = f"epoch {state.epoch}"
    except KeyboardInterrupt:
        if run.saved_at is not None or (resume and run.state_path is not None and run.state_path.exists()):
            where = f" (saved at {run.saved_at})" if run.saved_at else ""
            log(f"\ninterrupted{where}; resume with: mnistrec train --resume {run_dir}")
        else:
            log("\ninterrupted before the first epoch finished; nothing to resume")
        raise

    final_model = _final_model(state)
    calibration = _fit_temperature(final_model, run, config, log) or calibration  # held-out fit, else the given one
    metrics = _test_metrics(final_model, state, run, calibration) if evaluate_test else {}
    seconds = time.perf_counter() - start_time
    result = TrainResult(final_model, config, state.history, metrics, run_dir, seconds, best_epoch=state.best.epoch or None,
                         stopped_early=state.stopped_early, calibration=calibration, autocast=run.autocast_name)
    if run_dir and ctx.is_main:
        write_run(result, data)
    return result


def _final_model(state: TrainingState) -> nn.Module:
    """The weights the run keeps, in eval mode: the best validation epoch's when there was a split, else the last."""
    final_model = state.eval_model
    if state.best.state_dict is not None:
        final_model.load_state_dict(state.best.state_dict)
    return final_model.eval()


def _test_metrics(final_model: nn.Module, state: TrainingState, run: _Run,
                  calibration: dict[str, Any] | None) -> dict[str, Any]:
    """The test metrics of ``final_model``, calibrated by ``calibration``'s temperature when there is one."""
    # Seed style, the last epoch's test pass already scored these very weights: do not pass over the test set twice.
    if state.best.state_dict is None and run.last_test is not None and calibration is None:
        return run.last_test
    scored = calibrated(final_model, calibration["temperature"]) if calibration else final_model
    return evaluate(scored, run.test_x, run.test_y, state.config.eval_batch_size, run.ctx.device)


def _fit_temperature(model: nn.Module, run: _Run, config: TrainConfig,
                     log: Callable[[str], None]) -> dict[str, Any] | None:
    """Temperature scaling on the run's validation split (``None`` without one): the checkpoint's calibration."""
    if run.split.val_x is None:
        return None
    logits = predict_logits(model, run.split.val_x, config.eval_batch_size, run.ctx.device)
    record = calibration_record(logits, run.split.val_y, f"validation split: {len(run.split.val_y)} training images, "
                                f"split_seed {config.split_seed}" + (", limit_train" if config.limit_train else ""))
    log(f"calibration: temperature {record['temperature']:.4f} (validation ECE {100 * record['val_before']['ece']:.2f}% "
        f"-> {100 * record['val_after']['ece']:.2f}%)")
    return record


def _process_context(config: TrainConfig, ddp: bool) -> distributed.DistContext:
    """Join torchrun's process group if there is one (DDP unless ``not ddp``: then alone); apply ``config.threads``."""
    ctx = distributed.setup(resolve_device(config.device))
    if config.threads:
        torch.set_num_threads(config.threads)
    return ctx if ddp else ctx.alone()


def _start(config: TrainConfig, data: MNIST, ctx: distributed.DistContext, local_batch: int,
           run_dir: Path | None, log: Callable[[str], None] = lambda _: None) -> tuple[_Run, TrainingState]:
    """The data on the device, a fresh model and its :class:`TrainingState` (after ``torch.manual_seed``)."""
    device = ctx.device
    split = split_data(data, config)
    test_x, test_y = test_split(data, config)
    n_local = len(ctx.shard(torch.arange(len(split.train_x))))
    steps_per_epoch = math.ceil(n_local / local_batch)
    model = create_model(config.model, **config.model_kwargs).to(device)
    if channels_last_helps(model, device):
        model = model.to(memory_format=torch.channels_last)
    state = TrainingState.create(config, model, device, steps_per_epoch)
    augment = augmenter(config)
    train_x, normalise = split.train_x.to(device), _input_normalisation(model)
    if normalise is not None and augment is None:
        # Normalise the training set once instead of every batch: the same float ops on the same values, so the
        # same bits, ~18 us less per step. Augmentations work on raw pixels (0 is background), so not with those.
        split.train_x = train_x = normalise(train_x)
    else:
        normalise = None
    run = _Run(ctx, split, train_x, split.train_y.to(device), test_x, test_y, local_batch, n_local,
               steps_per_epoch, augment, ctx.wrap(model), run_dir / "last.pth" if run_dir else None,
               autocast_dtype(config.precision, device), normalise)
    if config.precision == "auto" and run.autocast is torch.bfloat16:
        log("precision auto: training steps in bfloat16 (this CPU computes it natively)")
    return run, state


def _input_normalisation(model: nn.Module) -> Normalize | None:
    """The model's one :class:`Normalize` (every model applies it to its input first), else ``None``."""
    found = [m for m in model.modules() if isinstance(m, Normalize)]
    return found[0] if len(found) == 1 else None


@contextlib.contextmanager
def _normalised_inputs(normalise: Normalize | None):
    """While training on data normalised up front, the model's own normalisation steps aside."""
    if normalise is None:
        yield
        return
    normalise.inputs_normalised = True
    try:
        yield
    finally:
        normalise.inputs_normalised = False


def train_epoch(state: TrainingState, run: _Run, stop: StopRequest, progress: bool) -> dict[str, float]:
    """One pass over this rank's shard of the training data; returns the epoch's row (train loss, accuracy, lr).

    Continues the epoch a Ctrl-C interrupted when ``state.partial`` says so; on a
    new Ctrl-C saves where it stopped and raises :class:`KeyboardInterrupt`.
    """
    from tqdm.auto import tqdm

    config, device, epoch = state.config, run.ctx.device, state.epoch
    model, optimizer, scaler = state.model, state.optimizer, state.scaler
    model.train()
    if state.partial:  # continue the epoch an earlier Ctrl-C stopped, with its data order
        partial, state.partial = state.partial, None
        start, order = int(partial["step"]), partial["order"].to(device)
        loss_sum, correct = partial["loss_sum"].to(device), partial["correct"].to(device)
    else:
        order = run.ctx.shard(torch.randperm(len(run.train_x), generator=state.generators["shuffle"])).to(device)
        start = 0
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.int64)
    steps = run.steps_per_epoch
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"epoch {epoch + 1}/{config.epochs}",
               disable=not progress, leave=False, unit="batch")
    checked = start  # the steps before this one had finite losses
    for step in bar:
        if stop.requested:
            _check_loss(loss_sum, state, run, checked, step)  # never save a state that went non-finite
            run.save(state, {"step": step, "order": order.cpu(), "loss_sum": loss_sum.cpu(), "correct": correct.cpu()})
            run.saved_at = f"epoch {epoch + 1}, step {step}/{steps}"
            raise KeyboardInterrupt
        if step - checked == FINITE_CHECK_STEPS:
            checked = _check_loss(loss_sum, state, run, checked, step)
        idx = order[step * run.local_batch : (step + 1) * run.local_batch]
        x, y = run.train_x[idx], run.train_y[idx]
        if run.augment is not None:
            x = run.augment(x, state.generators["augment"])
        if run.autocast is not None:
            with torch.autocast(device.type, dtype=run.autocast):
                logits = run.train_model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
        else:
            logits = run.train_model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if state.scheduler is not None:
            state.scheduler.step()
        if state.ema is not None:
            state.ema.update_parameters(model)
        loss_sum += loss.detach() * len(y)  # a NaN or inf loss makes the sum non-finite: what _check_loss sees
        correct += (logits.argmax(1) == y).sum()
    _check_loss(loss_sum, state, run, checked, steps)
    # The last step can overflow the weights with a finite loss; never checkpoint those.
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise _non_finite("weights became non-finite", epoch, steps - 1, optimizer, run.state_path)
    seen = torch.tensor(run.n_local, device=device, dtype=torch.float64)
    run.ctx.all_reduce_sum(loss_sum, correct, seen)  # training metrics over all ranks' examples
    return {"epoch": epoch + 1, "train_loss": float(loss_sum / seen), "train_accuracy": float(correct / seen),
            "lr": optimizer.param_groups[0]["lr"]}


def score_epoch(state: TrainingState, run: _Run, row: dict[str, float], evaluate_test: bool) -> None:
    """Add the epoch's validation (or, seed-style, test) scores to ``row``; track the best epoch and early stopping."""
    config, device = state.config, run.ctx.device
    eval_model = state.eval_model
    if run.split.val_x is not None:
        val = evaluate(eval_model, run.split.val_x, run.split.val_y, config.eval_batch_size, device)
        row.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
        state.best.update(row, eval_model)
        epochs_done = state.epoch + 1
        state.stopped_early = state.best.should_stop(epochs_done, config.early_stop) and epochs_done < config.epochs
    elif config.epoch_test and evaluate_test:
        test = evaluate(eval_model, run.test_x, run.test_y, config.eval_batch_size, device)
        row.update(test_loss=test["loss"], test_accuracy=test["accuracy"])
        run.last_test = test


def format_epoch(row: dict[str, float], epochs: int) -> str:
    """The seed's per-epoch line."""
    text = (f"Epoch {row['epoch']}/{epochs}, Train Loss: {row['train_loss']:.4f}, "
            f"Train Acc: {100 * row['train_accuracy']:.2f}%")
    if "val_loss" in row:
        text += f", Val Loss: {row['val_loss']:.4f}, Val Acc: {100 * row['val_accuracy']:.2f}%"
    if "test_loss" in row:
        text += f", Test Loss: {row['test_loss']:.4f}, Test Acc: {100 * row['test_accuracy']:.2f}%"
    return text


def _non_finite(what: str, epoch: int, step: int, optimizer: torch.optim.Optimizer, state_path: Path | None) -> NonFiniteLoss:
    lr_now = optimizer.param_groups[0]["lr"]
    kept = f"; the last good checkpoint {state_path} is kept" if state_path is not None and state_path.exists() else ""
    return NonFiniteLoss(f"{what} at epoch {epoch + 1}, step {step + 1} with learning rate {lr_now:.3g}; lower --lr{kept}")


def _check_loss(loss_sum: torch.Tensor, state: TrainingState, run: _Run, checked: int, step: int) -> int:
    """Raise :class:`NonFiniteLoss` if a loss of steps ``checked``..``step - 1`` was NaN or infinite; else return ``step``."""
    if bool(torch.isfinite(loss_sum)):
        return step
    where = f"step {step}" if step - checked <= 1 else f"steps {checked + 1}-{step}"
    lr_now = state.optimizer.param_groups[0]["lr"]
    kept = f"; the last good checkpoint {run.state_path} is kept" if run.state_path is not None and run.state_path.exists() else ""
    raise NonFiniteLoss(f"loss became {float(loss_sum)} at epoch {state.epoch + 1}, {where} with learning rate "
                        f"{lr_now:.3g}; lower --lr{kept}")
