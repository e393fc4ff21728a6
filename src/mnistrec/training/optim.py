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
    # Fused kernels on the CPU and CUDA: the whole update in one pass over the parameters. Measured on the
    # seed MLP (2-core box, one thread): Adam's step takes 1.2 ms fused, 4.7 ms foreach, 12 ms per tensor.
    # Deterministic like the others (same bits on every run and after a resume), though not the same
    # rounding as foreach, so runs differ in the last bits from those of earlier versions.
    device_type = next(model.parameters()).device.type
    kernel: dict[str, bool] = {"fused": True} if device_type in ("cpu", "cuda") else {"foreach": True}
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, **kernel)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, **kernel)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True, **kernel)


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
