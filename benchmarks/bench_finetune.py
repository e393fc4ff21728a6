"""Fine-tuning on a writer style MNIST does not have: accuracy on that style before and after, with 5, 10 and 50 images per digit.

The writer is :mod:`writer_style` (slanted, thick pen, slashed 0, crossed 7, open 4,
flagged 1 with a foot, hooked 9). Its pictures are written as PNG files and read
back through ``mnistrec finetune``'s own path (folders, preprocess, run directory).
Seeds: the training pool is seed 1 (the method was chosen on seed 2, the
validation set), the test set is seed 3, never used for any choice.

For each size the command's own function :func:`mnistrec.finetune_run.run_finetune`
runs with its defaults; the same-run reference is a naive fine-tune (the
issue's: 300 AdamW steps mixing the images with MNIST, no augmentation,
BatchNorm statistics updated), so the ratio of errors is a same-machine figure.

    python benchmarks/bench_finetune.py [--checkpoint CKPT] [--sizes 5 10 50] [--out benchmarks/results/finetune.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # noqa: E402
from writer_style import write_folder  # noqa: E402

from mnistrec.calibration import calibration_metrics  # noqa: E402
from mnistrec.checkpoint import default_checkpoint, load_checkpoint  # noqa: E402
from mnistrec.evaluate import predict_logits  # noqa: E402
from mnistrec.finetune import FinetuneConfig  # noqa: E402
from mnistrec.finetune_run import run_finetune  # noqa: E402
from mnistrec.folders import load_labelled_images  # noqa: E402

NAIVE = {"augment": "none", "freeze_bn": False, "user_fraction": 0.25}


def subset(pool: Path, per_digit: int, out: Path) -> Path:
    """The first ``per_digit`` files of every digit folder of ``pool``, copied to ``out``."""
    for digit in range(10):
        (out / str(digit)).mkdir(parents=True, exist_ok=True)
        for file in sorted((pool / str(digit)).iterdir())[:per_digit]:
            shutil.copy(file, out / str(digit) / file.name)
    return out


def style_scores(checkpoint: Path, test) -> dict:
    """Error rate on the style's test images, and ECE of the calibrated probabilities there."""
    loaded = load_checkpoint(checkpoint)
    logits = predict_logits(loaded.inference_model, test.images)
    errors = int((logits.argmax(1) != test.labels).sum())
    return {"errors": errors, "error_rate": errors / len(test), "ece": calibration_metrics(logits, test.labels)["ece"],
            "mnist_test_accuracy": (loaded.meta.get("metrics") or {}).get("accuracy")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="base model (default: the shipped one)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 10, 50])
    parser.add_argument("--test-per-digit", type=int, default=300)
    parser.add_argument("--data-dir")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive reference run")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "finetune.json"))
    args = parser.parse_args()
    base = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
    work = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    try:
        pool = write_folder(work / "pool", max(args.sizes), seed=1)
        test = load_labelled_images(write_folder(work / "test", args.test_per_digit, seed=3))
        before = style_scores(base, test)
        print(f"base {base.name}: style test errors {before['errors']}/{len(test)} ({100 * before['error_rate']:.2f}%)",
              flush=True)
        runs = []
        plan = [(n, "ours", {}) for n in args.sizes] + ([] if args.no_naive else [(10, "naive", NAIVE)])
        for per_digit, method, options in plan:
            images = subset(pool, per_digit, work / f"train-{per_digit}")
            start, cpu = time.perf_counter(), time.process_time()
            result = run_finetune(base, images, work / f"run-{method}-{per_digit}", FinetuneConfig(**options),
                                  args.data_dir, progress=False, log=lambda _: None)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            after = style_scores(result.model_path, test)
            row = {"method": method, "per_digit": per_digit, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
                   "style_errors_before": before["errors"], "style_errors_after": after["errors"],
                   "style_error_before": before["error_rate"], "style_error_after": after["error_rate"],
                   "error_cut": round(1 - after["errors"] / max(1, before["errors"]), 4),
                   "style_ece_after": round(after["ece"], 5),
                   "mnist_test_before": result.record["before"]["mnist_test_accuracy"],
                   "mnist_test_after": result.record["after"]["mnist_test_accuracy"],
                   "temperature": "refitted" if result.record["held_out"] else "kept from base"}
            runs.append(row)
            print(f"{method:>5} {per_digit:>3}/digit: style errors {row['style_errors_before']} -> {row['style_errors_after']} "
                  f"(cut {100 * row['error_cut']:.0f}%), MNIST test {100 * row['mnist_test_before']:.2f}% -> "
                  f"{100 * row['mnist_test_after']:.2f}%, {seconds:.0f} s ({cpu:.0f} s of CPU)", flush=True)
            # Written after every run: on a loaded machine a run can take many minutes.
            report = {"base": str(base), "style_test_images": len(test), "style_ece_before": round(before["ece"], 5),
                      "threads": torch.get_num_threads(), "complete": len(runs) == len(plan), "runs": runs,
                      "machine": machine_info()}
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
