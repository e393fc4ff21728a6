"""How a run updates the weights: optimiser, learning-rate schedule, weight EMA and augmentation."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..errors import MnistrecError
from .config import TrainConfig


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (Nesterov) as ``config`` says."""
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


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Any:
    """The per-batch learning-rate schedule (``None`` for a constant rate)."""
    total = config.epochs * steps_per_epoch
    if config.schedule == "onecycle":
        if total < 4:
            raise MnistrecError(f"--schedule onecycle needs at least 4 steps (this run has {total}); "
                                "use more data or epochs, a smaller --batch-size, or --schedule none")
        # Warm up for a quarter of the run, but at least two steps (tiny runs would otherwise divide by zero).
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total,
                                                   pct_start=max(0.25, 2 / total))
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return None


def ema_update(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], None]:
    """The weight-EMA update for ``AveragedModel``, with the decay warmed up as ``min(decay, (1 + n) / (10 + n))``.

    A plain EMA starts from the random initial weights: with decay 0.999 they
    still make up 42% of the average after 860 steps (two epochs), so early
    validation epochs score the initialisation, not the training. The warm-up
    (as in timm's ``ModelEmaV3``) makes the average follow the model closely at
    first and reach the full decay after a few thousand steps.
    """

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = float(num_averaged)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        if torch.is_floating_point(ema_params[0]):
            torch._foreach_lerp_(ema_params, params, weight)
        else:  # integer buffers (BatchNorm's num_batches_tracked): keep the model's count
            for ema_param, param in zip(ema_params, params):
                ema_param.copy_(param)

    return update


def augmenter(config: TrainConfig) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None:
    """The batched augmentation of ``config.augment`` (``None`` for ``none``)."""
    if config.augment == "none":
        return None
    from .. import augment

    return augment.get_augmentation(config.augment)
