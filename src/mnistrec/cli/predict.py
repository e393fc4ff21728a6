"""``mnistrec predict``: digits (or numbers) in the user's own image files and folders."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import MnistrecError
from .common import MODEL_SUFFIXES, add_backend, add_checkpoint, checkpoint_path, progress


def add_predict_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``mnistrec predict`` and its options on ``sub``."""
    p = sub.add_parser("predict", help="predict the digit (or number) in your own image files and folders",
                       description="Predict digits in image files (PNG, JPEG, BMP, GIF, WebP, TIFF) and folders. "
                                   "Each image is preprocessed the way MNIST was made (see the README). A file that "
                                   "cannot be read gets one line on stderr; the others are still predicted; the exit "
                                   "code is 1 when some files failed, 2 when none could be predicted.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders (a first argument ending in "
                   ".pth, .pt or .onnx is the checkpoint, as in `mnistrec predict CKPT IMAGE...`)")
    add_checkpoint(p, positional=False)
    p.add_argument("--top-k", type=int, default=3, metavar="K", help="how many most likely digits to list (default: 3)")
    p.add_argument("--json", action="store_true", help='print JSON Lines: {"path", "digit", "confidence", "unsure", "probabilities", "top_k"}')
    p.add_argument("--recursive", "-r", action="store_true", help="also look for images in the sub-folders of folders")
    p.add_argument("--invert", choices=["auto", "yes", "no"], default="auto",
                   help="dark ink on light paper is inverted: auto-detected (default), always (yes) or never (no)")
    p.add_argument("--multi", action="store_true", help='read a number of several digits, left to right: {"path", "number", "digits": [...]}')
    p.add_argument("--save-preprocessed", metavar="DIR", help="write the 28×28 images the model saw into DIR as PNG")
    p.add_argument("--explain", metavar="OUT.png", help="draw input, preprocessed image, probabilities and an occlusion "
                                                          "saliency map (first 12 images or digits)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_backend(p)
    p.set_defaults(func=cmd_predict)


def _format_prediction(result: dict) -> str:
    top = ", ".join(f"{t['digit']} {100 * t['probability']:.1f}%" for t in result["top_k"])
    # Below the calibrated-confidence threshold the line says so (JSON: "unsure": true).
    return f"{result['digit']:>6}  {100 * result['confidence']:>9.1f}%  {top}" + ("  (not sure)" if result["unsure"] else "")


def cmd_predict(args: argparse.Namespace) -> int:
    """Run ``mnistrec predict`` with the parsed ``args``; returns the exit code."""
    from tqdm import tqdm

    from ..backends import load_backend
    from ..predict import expand_paths, predict_files, save_preprocessed

    if args.top_k < 1:
        raise MnistrecError(f"--top-k must be at least 1, not {args.top_k}")
    if args.checkpoint_opt is None and Path(args.paths[0]).suffix.lower() in MODEL_SUFFIXES:
        args.checkpoint_opt, args.paths = args.paths[0], args.paths[1:]
        if not args.paths:
            raise MnistrecError(f"no image given after the checkpoint {args.checkpoint_opt}")
    checkpoint, _ = checkpoint_path(args)
    backend = load_backend(checkpoint, args.backend)
    paths = expand_paths(args.paths, args.recursive)
    if not paths:
        raise MnistrecError(f"no image files found in {', '.join(args.paths)}" + ("" if args.recursive else " (try --recursive)"))
    bar = tqdm(total=len(paths), unit="file", file=sys.stderr, disable=not progress(args) or len(paths) < 20)
    width = min(max(len(str(p)) for p in paths), 60)
    if not args.json:
        print(f"{'path':<{width}}  " + (f"{'number':>6}  digits (confidence)" if args.multi else f"{'digit':>6}  {'confidence':>10}  top-{args.top_k}"))
    failed, explained = 0, []
    for item in predict_files(backend, paths, args.top_k, args.invert, args.multi, on_done=bar.update):
        if item.error is not None:
            failed += 1
            bar.write(f"mnistrec: error: {item.path}: {item.error}", file=sys.stderr)
            continue
        result = item.result
        if args.json:
            print(json.dumps(result))
        elif args.multi:
            digits = ", ".join(f"{d['digit']} ({100 * d['confidence']:.0f}%{', not sure' if d['unsure'] else ''})"
                               for d in result["digits"])
            print(f"{str(item.path):<{width}}  {result['number']:>6}  {digits}")
        else:
            print(f"{str(item.path):<{width}}  {_format_prediction(result)}")
        if args.save_preprocessed:
            save_preprocessed(item, args.save_preprocessed)
        if args.explain and len(explained) < 12:
            explained.append(item)
    bar.close()
    if args.explain:
        from ..plots import explain_figure
        from ..predict import explain_rows

        if explained:
            print(f"explanation: {explain_figure(explain_rows(backend, explained, limit=12), Path(args.explain))}", file=sys.stderr)
        else:
            print("mnistrec: error: --explain: no image could be predicted, nothing to draw", file=sys.stderr)
    if failed and len(paths) > 1:  # one file: its own error line says it all
        print(f"mnistrec: {failed} of {len(paths)} file(s) failed", file=sys.stderr)
    # No file predicted is a user mistake like a bad option (exit 2); some failed among good ones is exit 1.
    return 2 if failed == len(paths) else 1 if failed else 0
