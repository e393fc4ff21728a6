"""Calibration of each recipe's model: test-set ECE and NLL before and after temperature scaling.

Every model must carry a temperature fitted on its validation split (training with
``--val-size`` does it; ``mnistrec calibrate`` for older checkpoints). The test set
is only scored here, never used to fit.

Usage::

    python benchmarks/bench_calibration.py --model seed=runs/seed-v5000/model.pth \\
        --model fast=runs/fast-v5000/model.pth --model best=src/mnistrec/default_model.pth

Writes ``benchmarks/results/calibration.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mnistrec.calibration import ECE_BINS, calibration_metrics  # noqa: E402
from mnistrec.checkpoint import load_checkpoint  # noqa: E402
from mnistrec.data import load_split  # noqa: E402
from mnistrec.evaluate import predict_logits  # noqa: E402
from machine import machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def score(name: str, path: str, images: torch.Tensor, labels: torch.Tensor) -> dict:
    loaded = load_checkpoint(path)
    if "calibration" not in loaded.meta:
        raise SystemExit(f"{path}: no temperature recorded; run `mnistrec calibrate {path}` first")
    raw = predict_logits(loaded.model, images)
    before, after = calibration_metrics(raw, labels), calibration_metrics(raw / loaded.temperature, labels)
    return {
        "name": name, "checkpoint": path, "model": loaded.model_name, "recipe": loaded.meta.get("recipe"),
        "temperature": loaded.temperature, "fitted_on": loaded.meta["calibration"]["fitted_on"],
        "test_accuracy": float((raw.argmax(1) == labels).double().mean()),
        "test_before": {k: round(v, 6) for k, v in before.items()},
        "test_after": {k: round(v, 6) for k, v in after.items()},
        "val_before": loaded.meta["calibration"].get("val_before"), "val_after": loaded.meta["calibration"].get("val_after"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH", help="a calibrated checkpoint")
    parser.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR"))
    parser.add_argument("--out", default=str(RESULTS / "calibration.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    images, labels = load_split("test", args.data_dir)
    rows = [score(*spec.split("=", 1), images, labels) for spec in args.model]
    result = {"benchmark": "calibration", "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "ece_bins": ECE_BINS, "split": "MNIST test set (10,000); temperatures fitted on validation splits",
              "models": rows, "machine": machine_info()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| model | test accuracy | T | ECE before | ECE after | NLL before | NLL after | mean confidence after |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        b, a = r["test_before"], r["test_after"]
        print(f"| {r['name']} ({r['model']}) | {100 * r['test_accuracy']:.2f}% | {r['temperature']:.3f} | "
              f"{100 * b['ece']:.2f}% | {100 * a['ece']:.2f}% | {b['nll']:.4f} | {a['nll']:.4f} | "
              f"{100 * a['mean_confidence']:.2f}% |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
