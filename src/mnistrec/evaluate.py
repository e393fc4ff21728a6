"""Metrics on whole tensors: loss, accuracy, per-class precision/recall, confusion matrix."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .calibration import ECE_BINS, expected_calibration_error, nll
from .data import to_float

if TYPE_CHECKING:
    from .backends import Backend


@torch.inference_mode()
def predict_logits(model: nn.Module | Backend, images: torch.Tensor, batch_size: int = 1000, device: str | torch.device = "cpu",
                   progress: bool = False) -> torch.Tensor:
    """Logits ``[N, 10]`` for ``uint8 [N, 28, 28]`` or float ``[N, 1, 28, 28]`` images, in batches.

    ``model`` is an ``nn.Module`` or an inference backend (:mod:`mnistrec.backends`).
    Only one batch is converted to float at a time, so memory stays bounded;
    ``progress`` shows a tqdm bar (in images) when there is more than one batch.
    """
    is_module = isinstance(model, nn.Module)
    was_training = model.training if is_module else False
    if is_module:
        model.eval()
    run = model if is_module else model.predict_logits
    outputs = []
    # No bar at all unless one is shown: even a disabled tqdm costs ~60 µs, a fifth of a served forward pass.
    shown = progress and len(images) > batch_size
    with _progress_bar(len(images)) if shown else contextlib.nullcontext() as bar:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            if batch.dtype == torch.uint8:
                batch = to_float(batch)
            outputs.append(run(batch.to(device) if is_module else batch).float().cpu())
            if bar is not None:
                bar.update(len(batch))
    if is_module:
        model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0, 10)


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="predict", unit="img", unit_scale=True, leave=False)


def confusion_matrix(targets: torch.Tensor, predictions: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    """``[true, predicted]`` counts."""
    index = targets.long() * num_classes + predictions.long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def metrics_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    """Loss, accuracy (a fraction in [0, 1]), calibration, per-class precision/recall and the confusion matrix.

    ``ece`` is the expected calibration error over 15 equal-width confidence bins
    and ``nll`` the mean negative log-likelihood (nats, in float64), both of
    ``softmax(logits)``: pass calibrated logits to score the calibrated model.
    """
    predictions = logits.argmax(1)
    cm = confusion_matrix(targets, predictions)
    true_pos = cm.diag().double()
    predicted = cm.sum(0).double()
    actual = cm.sum(1).double()
    precision = torch.where(predicted > 0, true_pos / predicted.clamp(min=1), torch.zeros_like(true_pos))
    recall = torch.where(actual > 0, true_pos / actual.clamp(min=1), torch.zeros_like(true_pos))
    return {
        "loss": float(F.cross_entropy(logits, targets)) if len(targets) else float("nan"),
        "accuracy": float((predictions == targets).double().mean()) if len(targets) else float("nan"),
        "count": int(len(targets)),
        "errors": int((predictions != targets).sum()),
        "ece": expected_calibration_error(logits.double().softmax(1), targets, ECE_BINS),
        "nll": nll(logits, targets),
        "precision": [round(float(v), 6) for v in precision],
        "recall": [round(float(v), 6) for v in recall],
        "confusion_matrix": cm.tolist(),
    }


def evaluate(model: nn.Module | Backend, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000,
             device: str | torch.device = "cpu", progress: bool = False) -> dict[str, Any]:
    """Evaluate ``model`` (a module or an inference backend) on a whole split; see :func:`metrics_from_logits`."""
    return metrics_from_logits(predict_logits(model, images, batch_size, device, progress), labels)


def format_report(metrics: dict[str, Any]) -> str:
    """A human-readable table of the metrics."""
    lines = [
        f"loss {metrics['loss']:.4f}   accuracy {100 * metrics['accuracy']:.2f}%   "
        f"({metrics['count'] - metrics['errors']}/{metrics['count']} correct)",
        f"calibration: ECE {100 * metrics['ece']:.2f}% (15 bins)   NLL {metrics['nll']:.4f}",
        "",
        "digit  precision  recall",
    ]
    for digit, (p, r) in enumerate(zip(metrics["precision"], metrics["recall"])):
        lines.append(f"  {digit}     {100 * p:6.2f}%  {100 * r:6.2f}%")
    lines += ["", "confusion matrix (rows: true digit, columns: predicted)", "     " + "".join(f"{d:>6}" for d in range(10))]
    for digit, row in enumerate(metrics["confusion_matrix"]):
        lines.append(f"  {digit}  " + "".join(f"{v:>6}" for v in row))
    return "\n".join(lines)
