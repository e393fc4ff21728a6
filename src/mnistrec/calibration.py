"""Calibrated probabilities: temperature scaling, expected calibration error, NLL, reliability bins.

Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", 2017)
divides a trained model's logits by one scalar ``T`` fitted to minimise the
negative log-likelihood on a held-out validation split (never the test set).
It changes no prediction (``argmax`` is unchanged), only how sure the
probabilities say the model is. The CNN recipes train with label smoothing,
which makes them under-confident (``T < 1`` sharpens them); the seed MLP is
slightly over-confident (``T > 1``).

A checkpoint stores its temperature under ``calibration`` (see
:func:`calibration_record`); :class:`mnistrec.checkpoint.LoadedModel` applies
it, so every consumer of ``LoadedModel.inference_model`` (CLI, HTTP API, page,
v2 protocol, ensembles, exports) sees calibrated logits.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError

#: Equal-width confidence bins of the expected calibration error (the usual 15, as in Guo et al.).
ECE_BINS = 15
#: Temperatures outside this range are refused when loading: no sane model needs them.
TEMPERATURE_RANGE = (0.02, 50.0)


class TemperatureScaled(nn.Module):
    """``model(x) / T``: the calibrated logits of ``model``.

    ``1 / T`` is a buffer, so ``torch.export``/ONNX/TorchScript fold it into the
    exported graph as one multiplication. The wrapped model stays reachable as
    ``.model`` (its ``state_dict`` is the checkpoint's).
    """

    def __init__(self, model: nn.Module, temperature: float) -> None:
        super().__init__()
        self.model = model
        self.temperature = float(temperature)
        self.register_buffer("inverse_temperature", torch.tensor(1.0 / float(temperature)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * self.inverse_temperature

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:.4f}"


def calibrated(model: nn.Module, temperature: float) -> nn.Module:
    """``model`` with its logits divided by ``temperature`` (``model`` itself when ``temperature`` is 1)."""
    if temperature == 1.0:
        return model
    return TemperatureScaled(model, temperature).eval()


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature ``T`` minimising the NLL of ``softmax(logits / T)`` on ``labels`` (LBFGS on ``log T``).

    Optimising ``log T`` keeps ``T`` positive without constraints; the problem is
    convex in ``1 / T``, so LBFGS with a line search converges in a few steps.
    """
    if len(labels) == 0:
        raise ValueError("cannot fit a temperature on no examples")
    logits, labels = logits.detach().double(), labels.long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    low, high = TEMPERATURE_RANGE
    return float(min(max(math.exp(float(log_t.detach())), low), high))


def nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood (cross-entropy, nats) of ``labels`` under ``softmax(logits)``."""
    return float(F.cross_entropy(logits.double(), labels.long())) if len(labels) else float("nan")


def reliability_bins(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per equal-width confidence bin ``(lo, hi]``: count, mean confidence and accuracy of the top-1 predictions."""
    confidence, predicted = probabilities.double().max(1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    # bucketize(right=False) puts c in bin i when edges[i] < c <= edges[i+1]; confidence 0 cannot be a top-1.
    index = (torch.bucketize(confidence, edges, right=False) - 1).clamp(0, bins - 1)
    rows = []
    for i in range(bins):
        mask = index == i
        n = int(mask.sum())
        rows.append({
            "low": float(edges[i]), "high": float(edges[i + 1]), "count": n,
            "confidence": float(confidence[mask].mean()) if n else float("nan"),
            "accuracy": float(correct[mask].mean()) if n else float("nan"),
        })
    return rows


def expected_calibration_error(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean |accuracy - confidence| over ``bins`` equal-width bins (a fraction)."""
    total = len(labels)
    if total == 0:
        return float("nan")
    rows = reliability_bins(probabilities, labels, bins)
    return float(sum(r["count"] / total * abs(r["accuracy"] - r["confidence"]) for r in rows if r["count"]))


def calibration_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``ece``, ``nll`` and ``mean_confidence`` of ``logits`` on ``labels``."""
    probabilities = logits.double().softmax(1)
    return {
        "ece": expected_calibration_error(probabilities, labels),
        "nll": nll(logits, labels),
        "mean_confidence": float(probabilities.max(1).values.mean()) if len(labels) else float("nan"),
    }


def calibration_record(logits: torch.Tensor, labels: torch.Tensor, source: str) -> dict[str, Any]:
    """Fit a temperature on validation ``logits`` (uncalibrated) and describe it for the checkpoint.

    ``source`` says which held-out images were used (e.g. ``"validation split: 5000 images, split_seed 0"``).
    The record keeps the validation ECE/NLL before and after, so the fit can be checked later.
    """
    temperature = fit_temperature(logits, labels)
    before, after = calibration_metrics(logits, labels), calibration_metrics(logits / temperature, labels)
    return {
        "method": "temperature scaling",
        "temperature": round(temperature, 6),
        "fitted_on": source,
        "count": int(len(labels)),
        "val_before": {k: round(v, 6) for k, v in before.items()},
        "val_after": {k: round(v, 6) for k, v in after.items()},
    }


def checkpoint_temperature(meta: dict[str, Any], source: str) -> float:
    """The temperature recorded in checkpoint metadata (1.0 when it has none); raises on an invalid one."""
    record = meta.get("calibration")
    if record is None:
        return 1.0
    try:
        temperature = float(record["temperature"])
    except (TypeError, KeyError, ValueError):
        raise CheckpointError(f"{source}: its calibration record has no numeric temperature") from None
    low, high = TEMPERATURE_RANGE
    if not low <= temperature <= high:  # also false for NaN
        raise CheckpointError(f"{source}: calibration temperature {temperature!r} is outside {low}..{high}")
    return temperature
