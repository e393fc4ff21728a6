"""What a run holds while it trains, and ``last.pth``, the file that holds it between processes.

:class:`TrainingState` is everything that changes during a run: weights,
optimiser, scheduler, EMA, gradient scaler, every RNG, the history, the
validation-selected best epoch and where an interrupted epoch stopped.
:meth:`TrainingState.to_checkpoint` and :meth:`TrainingState.restore` are
exact inverses, which is what makes a resumed run bit-for-bit an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import checkpoint_dict, read_checkpoint
from ..devices import autocast_dtype
from ..errors import CheckpointError, MnistrecError
from ..fileio import atomic_write
from .config import TrainConfig, comparable
from .optim import build_optimizer, build_scheduler, ema_update


@dataclass
class TrainResult:
    """What :func:`~mnistrec.training.loop.train` returns: the selected model, its history and test metrics."""

    model: nn.Module
    config: TrainConfig
    history: list[dict[str, float]]
    metrics: dict[str, Any]  # test metrics; empty when the test set was not evaluated
    run_dir: Path | None
    seconds: float
    best_epoch: int | None = None  # the validation-selected epoch whose weights ``model`` holds
    stopped_early: bool = False
    calibration: dict[str, Any] | None = None  # the temperature record stored in the checkpoint
    autocast: str | None = None  # the dtype training steps ran in under autocast ("bfloat16", "float16"), else None


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


@dataclass
class BestEpoch:
    """Validation-only model selection: the best epoch so far and a CPU copy of its weights.

    Better means higher validation accuracy, then lower validation loss. It is
    part of ``last.pth`` so a resumed run selects exactly as an uninterrupted one.
    """

    epoch: int = 0
    val_accuracy: float = -1.0
    val_loss: float = math.inf
    state_dict: dict[str, torch.Tensor] | None = None

    def update(self, row: dict[str, float], model: nn.Module) -> bool:
        better = (row["val_accuracy"], -row["val_loss"]) > (self.val_accuracy, -self.val_loss)
        if better:
            self.epoch, self.val_accuracy, self.val_loss = int(row["epoch"]), row["val_accuracy"], row["val_loss"]
            self.state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return better

    def should_stop(self, epoch: int, patience: int) -> bool:
        return patience > 0 and epoch - self.epoch >= patience

    def state(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainingState:
    """The mutable state of a run; ``last.pth`` is :meth:`to_checkpoint` of it."""

    config: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a torch LR scheduler, or None for a constant rate
    ema: torch.optim.swa_utils.AveragedModel | None
    scaler: torch.amp.GradScaler
    use_amp: bool
    generators: dict[str, torch.Generator]  # "shuffle" (data order) and "augment"
    history: list[dict[str, float]] = field(default_factory=list)
    best: BestEpoch = field(default_factory=BestEpoch)
    stopped_early: bool = False
    epoch: int = 0  # epochs completed
    partial: dict[str, Any] | None = None  # where an interrupted epoch stopped: step, data order, running sums

    @classmethod
    def create(cls, config: TrainConfig, model: nn.Module, device: torch.device, steps_per_epoch: int) -> "TrainingState":
        """A fresh state for ``model`` (already on ``device``); the RNGs are seeded from ``config.seed``."""
        optimizer = build_optimizer(config, model)
        scheduler = build_scheduler(config, optimizer, steps_per_epoch)
        # float16 needs a gradient scaler (its range is small); bfloat16 has float32's range and needs none.
        use_amp = autocast_dtype(config.precision, device) is torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        ema = None
        if config.ema_decay:
            ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_update(config.ema_decay), use_buffers=True)
        generators = {"shuffle": torch.Generator().manual_seed(config.seed),
                      "augment": torch.Generator().manual_seed(config.seed + 1)}
        return cls(config, model, optimizer, scheduler, ema, scaler, use_amp, generators)

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are evaluated and kept: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def to_checkpoint(self, partial: dict[str, Any] | None = None) -> dict[str, Any]:
        """The whole state as a checkpoint dict (``partial``: where an interrupted epoch stopped)."""
        config = self.config
        return checkpoint_dict(
            config.model,
            config.model_kwargs,
            self.model,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict() if self.scheduler is not None else None,
            ema=self.ema.state_dict() if self.ema is not None else None,
            scaler=self.scaler.state_dict() if self.use_amp else None,
            rng=_rng_state(self.generators),
            epoch=self.epoch,
            partial=partial,
            history=self.history,
            best=self.best.state(),
            stopped_early=self.stopped_early,
            config=comparable(config),
        )

    def save(self, path: Path, partial: dict[str, Any] | None = None) -> None:
        """Write :meth:`to_checkpoint` to ``path`` atomically."""
        payload = self.to_checkpoint(partial)
        atomic_write(path, lambda fh: torch.save(payload, fh))

    def restore(self, state_path: Path) -> None:
        """Load ``state_path`` (written by :meth:`save`) into this state; it must have been started with the same options."""
        state = read_checkpoint(state_path)
        _check_same_options(state_path, state.get("config"), comparable(self.config))
        try:
            self.model.load_state_dict(state["state_dict"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            _set_rng_state(state["rng"], self.generators)
            self.history = list(state["history"])
            self.best = BestEpoch(**state["best"])
            self.stopped_early = bool(state["stopped_early"])
            self.epoch = int(state["epoch"])
            self.partial = state.get("partial")
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{state_path}: not a complete training state ({type(exc).__name__}: {str(exc)[:120]})") from None


def _check_same_options(state_path: Path, saved: Any, now: dict[str, Any]) -> None:
    if not isinstance(saved, dict):
        raise CheckpointError(f"{state_path}: holds no training options; not an mnistrec training state")
    # An option newer than the saved state (e.g. precision) had its default's behaviour when that state was written.
    saved = {**comparable(TrainConfig()), **saved}
    if saved == now:
        return
    differ = [f"{k}={saved.get(k)!r} (now {now.get(k)!r})" for k in now if saved.get(k) != now.get(k)]
    raise MnistrecError(f"{state_path}: the run was started with other options: {', '.join(differ[:4])}; "
                        "resume with the same ones (or no option flags at all)")
