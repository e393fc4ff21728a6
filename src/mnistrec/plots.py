"""Matplotlib figures of a run, written as PNG with the Agg backend (no display needed)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: never try to open a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .fileio import atomic_write  # noqa: E402


def _save(fig, path: Path) -> Path:
    # Through atomic_write: a full disk or read-only folder is a one-line error, never a half PNG.
    try:
        atomic_write(path, lambda fh: fig.savefig(fh, format=path.suffix.lstrip(".") or "png", dpi=100, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


def prediction_grid(images: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor, path: Path, columns: int = 8) -> Path:
    """The seed's picture: test images titled with true and predicted labels; wrong ones in red."""
    count = len(images)
    rows = max(1, int(np.ceil(count / columns)))
    fig, axes = plt.subplots(rows, columns, figsize=(1.5 * columns, 1.7 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= count:
            continue
        ax.imshow(images[i].reshape(28, 28).numpy(), cmap="gray_r")
        wrong = int(predictions[i]) != int(labels[i])
        ax.set_title(f"true {int(labels[i])} / pred {int(predictions[i])}", fontsize=8, color="red" if wrong else "black")
    fig.suptitle("Test images: true / predicted label (wrong in red)")
    return _save(fig, path)


def training_curves(history: Sequence[dict[str, float]], path: Path) -> Path:
    """Loss and accuracy per epoch for train and validation/test."""
    epochs = [int(r["epoch"]) for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "val", "test"):
        if history and f"{split}_loss" in history[0]:
            ax_loss.plot(epochs, [r[f"{split}_loss"] for r in history], marker="o", label=split)
            ax_acc.plot(epochs, [100 * r[f"{split}_accuracy"] for r in history], marker="o", label=split)
    ax_loss.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.set(title="Accuracy", xlabel="epoch", ylabel="%")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def confusion_heatmap(matrix: Sequence[Sequence[int]], path: Path) -> Path:
    """Confusion matrix as a heat map with counts in the cells."""
    cm = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    # Log colour scale so the few off-diagonal errors are visible beside the large diagonal.
    image = ax.imshow(np.log1p(cm), cmap="Blues")
    for (r, c), value in np.ndenumerate(cm):
        ax.text(c, r, str(value), ha="center", va="center", fontsize=7,
                color="white" if np.log1p(value) > np.log1p(cm.max()) / 2 else "black")
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted digit", ylabel="true digit", title="Confusion matrix (test)")
    fig.colorbar(image, ax=ax, label="log(1 + count)")
    return _save(fig, path)


def confident_mistakes(images: torch.Tensor, labels: torch.Tensor, probabilities: torch.Tensor, path: Path, count: int = 16) -> Path:
    """The wrongly classified test images the model was most sure about."""
    predictions = probabilities.argmax(1)
    wrong = (predictions != labels).nonzero().flatten()
    confidence = probabilities[wrong, predictions[wrong]]
    chosen = wrong[confidence.argsort(descending=True)[:count]]
    columns = 8
    rows = max(1, int(np.ceil(len(chosen) / columns)))
    fig, axes = plt.subplots(rows, columns, figsize=(1.5 * columns, 1.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, chosen.tolist()):
        ax.imshow(images[i].reshape(28, 28).numpy(), cmap="gray_r")
        ax.set_title(f"true {int(labels[i])}\npred {int(predictions[i])} {100 * float(probabilities[i, predictions[i]]):.0f}%",
                     fontsize=8, color="red")
    if len(chosen) == 0:
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    fig.suptitle("Most confident mistakes on the test set")
    return _save(fig, path)


def reliability_diagram(curves: dict[str, torch.Tensor], labels: torch.Tensor, path: Path) -> Path:
    """Reliability diagram: accuracy against confidence in 15 equal-width bins, one panel per logits in ``curves``.

    ``curves`` maps a title (e.g. ``"uncalibrated (T = 1)"``) to ``[N, 10]`` logits.
    Bars below the diagonal are over-confident bins, above it under-confident;
    the lower strip counts the predictions per bin (log scale: on MNIST nearly
    all of them are in the last bin).
    """
    from .calibration import ECE_BINS, expected_calibration_error, reliability_bins

    fig, axes = plt.subplots(2, len(curves), figsize=(4.6 * len(curves), 5.6), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    width = 1 / ECE_BINS
    for (title, logits), ax, ax_count in zip(curves.items(), axes[0], axes[1]):
        probabilities = logits.double().softmax(1)
        rows = reliability_bins(probabilities, labels)
        centers = [(r["low"] + r["high"]) / 2 for r in rows]
        accuracy = [r["accuracy"] if r["count"] else 0.0 for r in rows]
        confidence = [r["confidence"] if r["count"] else 0.0 for r in rows]
        ax.bar(centers, accuracy, width=width, edgecolor="black", color="tab:blue", label="accuracy")
        ax.bar(centers, [c - a for a, c in zip(accuracy, confidence)], bottom=accuracy, width=width,
               color="tab:red", alpha=0.35, edgecolor="tab:red", label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ece = expected_calibration_error(probabilities, labels)
        ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=f"{title}\nECE {100 * ece:.2f}% ({ECE_BINS} bins)")
        ax.legend(loc="upper left", fontsize=8)
        ax_count.bar(centers, [max(r["count"], 0.5) for r in rows], width=width, color="tab:gray", log=True)
        ax_count.set(xlabel="confidence (top-1 probability)", ylabel="count")
    return _save(fig, path)


def read_history(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(fh)]


def plot_run(run_dir: str | Path, data_dir: str | Path | None = None, sample_count: int = 32) -> list[Path]:
    """(Re)draw every picture of a run from its ``model.pth``, ``history.csv`` and the test set.

    The reliability diagram (``reliability.png``) shows the test set with and without
    the checkpoint's temperature; the temperature itself was fitted on validation images.
    """
    from .checkpoint import load_checkpoint
    from .data import load_split
    from .errors import MnistrecError
    from .evaluate import metrics_from_logits, predict_logits

    run_dir = Path(run_dir)
    for needed in ("model.pth", "history.csv"):
        if not (run_dir / needed).is_file():
            raise MnistrecError(f"{run_dir} is not a run directory: {needed} is missing")
    loaded = load_checkpoint(run_dir / "model.pth")
    images, labels = load_split("test", data_dir)
    limit = (loaded.meta.get("config") or {}).get("limit_test")
    if limit:
        images, labels = images[:limit], labels[:limit]
    raw = predict_logits(loaded.model, images)
    logits = raw / loaded.temperature
    probabilities = logits.softmax(1)
    metrics = metrics_from_logits(logits, labels)
    return [
        training_curves(read_history(run_dir / "history.csv"), run_dir / "curves.png"),
        prediction_grid(images[:sample_count], labels[:sample_count], logits[:sample_count].argmax(1), run_dir / "predictions.png"),
        confusion_heatmap(metrics["confusion_matrix"], run_dir / "confusion.png"),
        confident_mistakes(images, labels, probabilities, run_dir / "mistakes.png"),
        reliability_diagram({"uncalibrated (T = 1)": raw, f"calibrated (T = {loaded.temperature:.3f})": logits}
                            if loaded.temperature != 1.0 else {"uncalibrated (no temperature fitted)": raw},
                            labels, run_dir / "reliability.png"),
    ]


def explain_figure(rows: Sequence[dict], path: Path) -> Path:
    """One row per prediction: the input picture, the 28×28 the model saw, probability bars, occlusion saliency.

    Each row is ``{"title", "input": PIL image or array, "tensor": [1, 28, 28], "probabilities": [10], "saliency": [28, 28]}``.
    """
    count = max(1, len(rows))
    fig, axes = plt.subplots(count, 4, figsize=(13, 2.8 * count), squeeze=False,
                             gridspec_kw={"width_ratios": [1.3, 1, 1.6, 1]})
    for ax_row, row in zip(axes, rows):
        ax_in, ax_pre, ax_bar, ax_sal = ax_row
        picture = np.asarray(row["input"])
        ax_in.imshow(picture, cmap="gray" if picture.ndim == 2 else None)
        ax_in.set_title(row["title"], fontsize=9)
        ax_pre.imshow(np.asarray(row["tensor"]).reshape(28, 28), cmap="gray", vmin=0, vmax=1)
        ax_pre.set_title("what the model saw (28×28)", fontsize=9)
        probs = np.asarray(row["probabilities"], dtype=float)
        best = int(probs.argmax())
        ax_bar.bar(range(10), 100 * probs, color=["tab:red" if d == best else "tab:blue" for d in range(10)])
        ax_bar.set(xticks=range(10), ylim=(0, 100), ylabel="%", xlabel="digit")
        ax_bar.set_title(f"prediction {best} ({100 * probs[best]:.1f}%)", fontsize=9)
        ax_bar.grid(axis="y", alpha=0.3)
        saliency = np.asarray(row["saliency"], dtype=float).reshape(28, 28)
        limit = max(float(np.abs(saliency).max()), 1e-6)
        ax_sal.imshow(np.asarray(row["tensor"]).reshape(28, 28), cmap="gray", vmin=0, vmax=1)
        ax_sal.imshow(saliency, cmap="bwr", vmin=-limit, vmax=limit, alpha=0.6)
        ax_sal.set_title(f"occlusion saliency for {best}\n(red: evidence for, blue: against)", fontsize=9)
        for ax in (ax_in, ax_pre, ax_sal):
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return _save(fig, Path(path))
