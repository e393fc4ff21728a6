"""Fine-tuning a trained model on a few labelled images of someone's handwriting, without forgetting MNIST.

Few-shot is the case this is built for (10 images per digit). The method was
chosen on a validation set of a synthetic writer and MNIST's validation split,
never on test images (the runs are in docs/finetune.md):

- every batch of 128 is one quarter the user's images, augmented with MNIST
  training's affine family (rotation, shear, zoom, shifts: ten pictures stand
  for many), and three quarters MNIST training images replayed with whole-pixel
  shifts, so MNIST accuracy does not collapse;
- BatchNorm statistics stay frozen at the base model's (a batch of one writer's
  digits would otherwise shift them for every input);
- 300 AdamW steps, peak 1e-3, cosine schedule with a 10% warm-up, and the base
  recipe's label smoothing, so the logits keep the scale the base temperature
  was fitted for.

Tried and not kept (no better on validation): stronger augmentation with
elastic strokes (MNIST validation -0.1 point), training only the last layers,
distillation towards the base model's outputs on the replayed images, and
interpolating the weights back towards the base model's.

The loop is resumable like ``train``: the whole state is saved atomically to
``RUN_DIR/last.pth`` every 50 steps and on Ctrl-C (see :mod:`mnistrec.finetune_run`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .augment import PRESETS, RandomAffine
from .errors import MnistrecError

#: A stronger augmentation of the user's images (elastic strokes too), kept as an option: not better on validation.
USER_AUGMENT = RandomAffine(rotation_deg=12.0, shift_px=2.0, scale=(0.85, 1.15), shear_deg=12.0,
                            elastic_alpha_px=1.0, p=0.95)
USER_AUGMENTS: dict[str, RandomAffine | None] = {"none": None, "affine": PRESETS["affine"], "strong": USER_AUGMENT}
#: MNIST replay: whole-pixel shifts, as the recipes train.
REPLAY_AUGMENT = RandomAffine(shift_px=2.0, whole_pixels=True)


@dataclass
class FinetuneConfig:
    """Every knob of a fine-tuning run (defaults: the method chosen on validation)."""

    steps: int = 300
    batch_size: int = 128  # images per step, user and replay together
    user_fraction: float = 0.25  # share of each batch drawn from the user's images
    lr: float = 1e-3  # peak learning rate (AdamW), after a warm-up of 10% of the steps
    weight_decay: float = 0.0
    label_smoothing: float | None = None  # None: the base recipe's
    freeze_bn: bool = True
    augment: str = "affine"  # augmentation of the user's images: none, affine (MNIST training's) or strong
    seed: int = 0
    threads: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        checks = [
            (self.steps >= 1, f"--steps must be at least 1 (got {self.steps})"),
            (self.batch_size >= 2, f"--batch-size must be at least 2 (got {self.batch_size})"),
            (0 < self.user_fraction <= 1, f"--user-fraction must be in (0, 1] (got {self.user_fraction})"),
            (self.lr > 0 and math.isfinite(self.lr), f"--lr must be a positive number (got {self.lr})"),
            (self.augment in USER_AUGMENTS, f"unknown augmentation {self.augment!r}; choose from: {', '.join(USER_AUGMENTS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise MnistrecError(message)


def freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode: it normalises with the base model's running statistics."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


class Finetuner:
    """One fine-tuning run's state: model, optimiser, schedule, RNGs and step; :meth:`step` advances it by one."""

    def __init__(self, model: nn.Module, config: FinetuneConfig, user_x: torch.Tensor, user_y: torch.Tensor,
                 replay_x: torch.Tensor | None, replay_y: torch.Tensor | None, label_smoothing: float = 0.0) -> None:
        config.validate()
        self.config, self.model = config, model
        self.user_x, self.user_y, self.replay_x, self.replay_y = user_x, user_y, replay_x, replay_y
        self.label_smoothing = config.label_smoothing if config.label_smoothing is not None else label_smoothing
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, foreach=True)
        warmup = max(1, config.steps // 10)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: _warm_cosine(s, warmup, config.steps))
        self.generator = torch.Generator().manual_seed(config.seed)
        self.done = 0
        self.n_user = max(1, round(config.batch_size * config.user_fraction)) if replay_x is not None else config.batch_size

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.generator
        pick = torch.randint(len(self.user_x), (self.n_user,), generator=g)
        x, y = self.user_x[pick], self.user_y[pick]
        augment = USER_AUGMENTS[self.config.augment]
        if augment is not None:
            x = augment(x, g)
        n_replay = self.config.batch_size - self.n_user
        if self.replay_x is not None and n_replay > 0:
            pick = torch.randint(len(self.replay_x), (n_replay,), generator=g)
            replay = self.replay_x[pick]
            replay = REPLAY_AUGMENT(replay.unsqueeze(1).float().div_(255) if replay.dtype == torch.uint8 else replay, g)
            x, y = torch.cat([x, replay]), torch.cat([y, self.replay_y[pick]])
        return x, y

    def step(self) -> float:
        """One optimiser step; returns the loss."""
        self.model.train()
        if self.config.freeze_bn:
            freeze_batchnorm(self.model)
        x, y = self._batch()
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        if not torch.isfinite(loss):
            raise MnistrecError(f"fine-tuning diverged at step {self.done + 1} (loss {loss.item()}); try a smaller --lr")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.done += 1
        return float(loss.detach())

    def state(self) -> dict[str, Any]:
        """Everything needed to continue bit-exactly (weights are saved by the caller with the checkpoint)."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(), "step": self.done}

    def load_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.done = int(state["step"])


def _warm_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def finetune_model(model: nn.Module, config: FinetuneConfig, user_x: torch.Tensor, user_y: torch.Tensor,
                   replay_x: torch.Tensor | None = None, replay_y: torch.Tensor | None = None,
                   label_smoothing: float = 0.0, on_step: Callable[[int, float], None] | None = None) -> nn.Module:
    """Fine-tune a copy of ``model`` in memory (no run directory, no resume); returns it in eval mode."""
    model = copy.deepcopy(model)
    tuner = Finetuner(model, config, user_x, user_y, replay_x, replay_y, label_smoothing)
    if config.threads:
        torch.set_num_threads(config.threads)
    while tuner.done < config.steps:
        loss = tuner.step()
        if on_step:
            on_step(tuner.done, loss)
    return model.eval()
