"""The data a run sees: training images, the held-out validation split, and the test images."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import MNIST, to_float
from ..errors import MnistrecError
from .config import TrainConfig


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


def test_split(data: MNIST, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images (uint8) and labels a run reports on, honouring ``limit_test``."""
    if config.limit_test:
        return data.test_images[: config.limit_test], data.test_labels[: config.limit_test]
    return data.test_images, data.test_labels
