"""Commands on a trained model: ``evaluate``, ``calibrate``, ``export`` and ``models``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import add_backend, add_checkpoint, add_data_dir, checkpoint_path, positive_int, progress


def add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``mnistrec evaluate`` and its options on ``sub``."""
    p = sub.add_parser("evaluate", help="test-set loss, accuracy, calibration (ECE, NLL), per-class precision/recall, "
                       "confusion matrix")
    add_checkpoint(p)
    add_data_dir(p)
    add_backend(p)
    p.add_argument("--batch-size", type=positive_int, default=1000, help="images per forward pass (default: 1000)")
    p.add_argument("--json", action="store_true", help="print one JSON object; `accuracy` and `ece` (15 bins) are "
                   "fractions in [0, 1], `nll` in nats")
    p.add_argument("--limit-test", type=int, metavar="N", help="use only the first N test images")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Run ``mnistrec evaluate`` with the parsed ``args``; returns the exit code."""
    from ..backends import load_backend
    from ..data import load_split
    from ..evaluate import evaluate, format_report

    checkpoint, _ = checkpoint_path(args)
    backend = load_backend(checkpoint, args.backend)
    images, labels = load_split("test", args.data_dir)
    if args.limit_test:
        images, labels = images[: args.limit_test], labels[: args.limit_test]
    metrics = evaluate(backend, images, labels, args.batch_size, progress=progress(args))
    if args.json:
        print(json.dumps({"checkpoint": str(checkpoint), "model": backend.model_name, "backend": backend.name, **metrics}))
    else:
        print(f"{checkpoint} ({backend.model_name}, {backend.name} backend) on {len(labels)} test images")
        print(format_report(metrics))
    return 0


def add_calibrate_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``mnistrec calibrate`` and its options on ``sub``."""
    p = sub.add_parser("calibrate", help="fit a checkpoint's temperature on held-out training images (never the test set)",
                       description="Temperature scaling: fit T so that softmax(logits / T) has the least NLL on held-out "
                                   "training images, and store it in the checkpoint; every command then shows calibrated "
                                   "probabilities. By default the checkpoint's own validation split is used (it was "
                                   "trained with --val-size). See docs/calibration.md.")
    p.add_argument("checkpoint", help="a .pth checkpoint")
    p.add_argument("-o", "--out", metavar="OUT", help="write the calibrated checkpoint here (default: replace CHECKPOINT)")
    add_data_dir(p)
    p.add_argument("--val-size", type=positive_int, help="held-out training images to fit on (default: the checkpoint's "
                   "own --val-size)")
    p.add_argument("--split-seed", type=int, help="seed of the held-out split (default: the checkpoint's, 0)")
    p.add_argument("--from", dest="source", metavar="CKPT", help="copy the temperature of CKPT, a calibrated model of "
                   "the same recipe trained with --val-size (for models trained on all 60,000 images)")
    p.add_argument("--allow-seen", action="store_true", help="fit on images the model was trained on (biased: "
                   "over-confident on new images)")
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Run ``mnistrec calibrate`` with the parsed ``args``; returns the exit code."""
    from ..calibrate import calibrate_checkpoint, describe

    record = calibrate_checkpoint(args.checkpoint, args.out, args.data_dir, args.val_size, args.split_seed,
                                  args.allow_seen, args.source)
    print(f"{args.out or args.checkpoint}: {describe(record)}")
    return 0


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``mnistrec export`` and its options on ``sub``."""
    from ..export import FORMATS, OPSET

    p = sub.add_parser("export", help="export a checkpoint to ONNX or TorchScript (checked against PyTorch)",
                       description="Export a checkpoint. The exported model takes float32 [N, 1, 28, 28] pixels in [0, 1] "
                                   "(ink = 1) and returns [N, 10] calibrated logits; the MNIST normalisation and the "
                                   "checkpoint's temperature are inside it.")
    add_checkpoint(p)
    p.add_argument("--format", choices=FORMATS, default="onnx", help="onnx (dynamic batch axis) or torchscript (default: onnx)")
    p.add_argument("-o", "--out", metavar="OUT", help="output file (default: the checkpoint name with .onnx or .pt; "
                   "for the shipped model mnistrec-default.onnx/.pt in the current folder)")
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default: {OPSET})")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """Run ``mnistrec export`` with the parsed ``args``; returns the exit code."""
    from ..export import export_checkpoint

    from ..export import SUFFIXES

    checkpoint, is_default = checkpoint_path(args)
    out = args.out or (Path("mnistrec-default").with_suffix(SUFFIXES[args.format]) if is_default else None)
    out = export_checkpoint(checkpoint, args.format, out, args.opset)
    print(f"{args.format} model written to {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0


def add_models_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``mnistrec models`` and its options on ``sub``."""
    p = sub.add_parser("models", help="list the models with parameter counts and FLOPs per image")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    """Run ``mnistrec models`` with the parsed ``args``; returns the exit code."""
    from ..models import describe_models

    rows = describe_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<14}{'parameters':>12}{'MFLOPs/img':>12}  description")
    for r in rows:
        print(f"{r['name']:<14}{r['parameters']:>12,}{r['flops'] / 1e6:>12.2f}  {r['description']}")
    return 0
