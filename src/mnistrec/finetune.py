"""Fine-tuning a trained model on a few labelled images of someone's handwriting, without forgetting MNIST.

Few-shot is the case this is built for (10 images per digit). What makes it work
(chosen on a validation set of a synthetic writer, see docs/finetune.md):

- every batch mixes the user's images, strongly augmented (rotation, shear,
  zoom, shifts, elastic strokes: ten pictures become thousands of plausible
  ones), with MNIST training images replayed so MNIST accuracy does not collapse;
- BatchNorm statistics stay frozen at the base model's (a batch of one writer's
  digits would otherwise shift them for every input);
- the weights are pulled back towards the base model's (L2-SP, Li et al. 2018)
  rather than decayed towards zero;
- a short cosine schedule with warm-up, and the base recipe's label smoothing,
  so the logits keep the scale the base temperature was fitted for.

The loop is resumable like ``train``: the whole state is saved atomically to
``RUN_DIR/last.pth`` every ``save_every`` steps and on Ctrl-C.
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

#: Augmentation of the user's images: stronger than MNIST training's, since ten pictures must stand for a hand.
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
    user_fraction: float = 0.5  # share of each batch drawn from the user's images
    lr: float = 1e-3  # peak learning rate (AdamW), after a warm-up of 10% of the steps
    anchor: float = 0.0  # L2-SP strength: sum of squared distances to the base weights
    weight_decay: float = 0.0
    label_smoothing: float | None = None  # None: the base recipe's
    freeze_bn: bool = True
    layers: int = 0  # train only the last this many conv/linear layers (and what follows them); 0 = all
    distill: float = 0.0  # weight of a KL term keeping replayed MNIST predictions those of the base model
    merge: float = 1.0  # final weights = base + merge * (fine-tuned - base) (WiSE-FT, Wortsman et al. 2022); 1 = none
    augment: str = "strong"  # augmentation of the user's images: none, affine (MNIST training's) or strong
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
            (self.anchor >= 0, f"--anchor must be >= 0 (got {self.anchor})"),
            (0 < self.merge <= 1, f"--merge must be in (0, 1] (got {self.merge})"),
        ]
        for ok, message in checks:
            if not ok:
                raise MnistrecError(message)


def freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode: it normalises with the base model's running statistics."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def set_trainable(model: nn.Module, layers: int) -> None:
    """Train only the last ``layers`` conv/linear layers and every module after the first of them (0: everything)."""
    modules = list(model.modules())
    weighted = [i for i, m in enumerate(modules) if isinstance(m, (nn.Conv2d, nn.Linear))]
    first = weighted[-layers] if 0 < layers <= len(weighted) else 0
    keep = {id(p) for m in modules[first:] for p in m.parameters(recurse=False)}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


class Finetuner:
    """One fine-tuning run's state: model, optimiser, schedule, RNGs and step; :meth:`step` advances it by one."""

    def __init__(self, model: nn.Module, config: FinetuneConfig, user_x: torch.Tensor, user_y: torch.Tensor,
                 replay_x: torch.Tensor | None, replay_y: torch.Tensor | None, label_smoothing: float = 0.0) -> None:
        config.validate()
        self.config, self.model = config, model
        self.user_x, self.user_y, self.replay_x, self.replay_y = user_x, user_y, replay_x, replay_y
        self.label_smoothing = config.label_smoothing if config.label_smoothing is not None else label_smoothing
        set_trainable(model, config.layers)
        self.reference = [p.detach().clone() for p in model.parameters()]
        self.teacher = copy.deepcopy(model).eval() if config.distill else None
        decay = [p for p in model.parameters() if p.ndim > 1 and p.requires_grad]
        no_decay = [p for p in model.parameters() if p.ndim <= 1 and p.requires_grad]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, foreach=True)
        warmup = max(1, config.steps // 10)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: _warm_cosine(s, warmup, config.steps))
        self.generator = torch.Generator().manual_seed(config.seed)
        self.done = 0
        self.n_user = max(1, round(config.batch_size * config.user_fraction)) if replay_x is not None else config.batch_size

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor, int]:
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
        return x, y, self.n_user

    def step(self) -> float:
        """One optimiser step; returns the loss."""
        self.model.train()
        if self.config.freeze_bn:
            freeze_batchnorm(self.model)
        x, y, n_user = self._batch()
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        if self.teacher is not None and len(x) > n_user:
            with torch.no_grad():
                target = self.teacher(x[n_user:]).log_softmax(1)
            kl = F.kl_div(logits[n_user:].log_softmax(1), target, log_target=True, reduction="batchmean")
            loss = loss + self.config.distill * kl
        if self.config.anchor:
            drift = sum(((p - r) ** 2).sum() for p, r in zip(self.model.parameters(), self.reference) if p.requires_grad)
            loss = loss + self.config.anchor * drift
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
                "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(), "step": self.done,
                "reference": [r.clone() for r in self.reference]}

    def load_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.done = int(state["step"])
        self.reference = [r.clone() for r in state["reference"]]


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
    merge_into(model, tuner.reference, config.merge)
    return model.eval()


@torch.no_grad()
def merge_into(model: nn.Module, reference: list[torch.Tensor], weight: float) -> None:
    """Move ``model``'s parameters to ``reference + weight * (params - reference)`` (no-op for weight 1)."""
    if weight == 1.0:
        return
    for p, r in zip(model.parameters(), reference):
        p.copy_(r + weight * (p - r))
