"""Command-line interface: argument parsing only; the work is done by the modules it calls.

Every sub-command is a ``cmd_*`` function taking the parsed arguments and
returning an exit code. User mistakes (:class:`MnistrecError`) print one line on
stderr and exit 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from .errors import MnistrecError


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", metavar="DIR", help="folder with the four MNIST IDX files, gzip or raw "
                        "(default: $MNIST_DATA_DIR, else ~/.cache/mnistrec/mnist)")


def _add_backend(parser: argparse.ArgumentParser, onnx_files: bool = True) -> None:
    what = "takes an .onnx export, or exports a .pth in memory" if onnx_files else "on the checkpoint exported in memory"
    parser.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                        help=f"inference engine: PyTorch (default), or onnxruntime ({what})")


#: A first positional argument with one of these endings is a checkpoint (the form before the shipped default model).
MODEL_SUFFIXES = (".pth", ".pt", ".onnx")


def _add_checkpoint(parser: argparse.ArgumentParser, positional: bool = True) -> None:
    """``-c/--checkpoint FILE`` and, for the older form, an optional positional checkpoint."""
    what = "a .pth checkpoint (ours, or a seed-style bare state_dict), or an exported .onnx with --backend onnx"
    if positional:
        parser.add_argument("checkpoint", nargs="?", help=f"{what} (default: the shipped model)")
    parser.add_argument("-c", "--checkpoint", dest="checkpoint_opt", metavar="FILE",
                        help=f"{what} (default: the model shipped with mnistrec)")


def _checkpoint(args: argparse.Namespace) -> tuple[Path, bool]:
    """``(path, is_default)``: the checkpoint named by ``-c``, positionally, or else the shipped default model."""
    from .checkpoint import default_checkpoint

    named = [c for c in (getattr(args, "checkpoint", None), args.checkpoint_opt) if c]
    if len(named) > 1:
        raise MnistrecError("give the checkpoint once: either positionally or with --checkpoint")
    return (Path(named[0]), False) if named else (default_checkpoint(), True)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def _progress(args: argparse.Namespace) -> bool:
    # tqdm bars only for a person watching a terminal.
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


# --------------------------------------------------------------------------- train


def add_train_parser(sub) -> None:
    from .training import RECIPES, TrainConfig, recipe_names

    defaults = TrainConfig()
    p = sub.add_parser("train", help="train a recipe and write a run directory",
                       description="Train a model. The recipe sets every option; flags override single values.")
    p.add_argument("--recipe", choices=recipe_names(), help="named set of options (default: seed, the original notebook)")
    _add_data_dir(p)
    p.add_argument("--out", metavar="RUN_DIR", help="run directory for checkpoints, metrics and pictures (default: runs/<recipe>)")
    p.add_argument("--save", metavar="PATH", default="mnist_model.pth", help="also copy the trained model here, as the seed did (default: mnist_model.pth; '' to skip)")
    p.add_argument("--model", help=f"model name, see `mnistrec models` (recipe default; seed: {defaults.model})")
    p.add_argument("--epochs", type=int, help=f"number of epochs (seed: {defaults.epochs})")
    p.add_argument("--batch-size", type=int, help=f"examples per step; under torchrun the global batch, split evenly over the processes (seed: {defaults.batch_size})")
    p.add_argument("--lr", type=float, help=f"(peak) learning rate (seed: {defaults.lr})")
    p.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], help="optimizer; sgd uses Nesterov momentum (seed: adam)")
    p.add_argument("--weight-decay", type=float, help="weight decay on weight matrices and kernels")
    p.add_argument("--schedule", choices=["none", "onecycle", "cosine"], help="learning-rate schedule, stepped per batch")
    p.add_argument("--label-smoothing", type=float, help="label smoothing for the cross-entropy loss")
    p.add_argument("--ema-decay", type=float, help="decay of the weight EMA; 0 disables it")
    p.add_argument("--augment", metavar="PRESET", help="batched augmentation preset: none, shift, affine, affine+elastic "
                   "(see the README)")
    p.add_argument("--val-size", type=int, help="training examples held out for validation; selection uses them, never the test set")
    p.add_argument("--early-stop", type=int, metavar="EPOCHS", help="stop after this many epochs without a better "
                   "validation accuracy (needs --val-size); the best validation epoch is kept either way")
    p.add_argument("--final", action="store_true", help="choose the epoch count on the validation split (needs --val-size), then "
                   "retrain on all training images with it (RUN_DIR/selection holds the selection run)")
    p.add_argument("--ensemble-size", type=int, metavar="N", help="train N models with seeds SEED, SEED+1, ... and "
                   f"report each and their averaged softmax (ensemble recipe: {RECIPES['ensemble']['ensemble_size']})")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="ensembles: also report test-time augmentation over 1-pixel shifted views")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for PyTorch (default: PyTorch's choice; "
                   "1 is faster on a busy machine)")
    p.add_argument("--seed", type=int, help=f"random seed; same seed and machine give the same metrics (default: {defaults.seed})")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="where to train (default: auto)")
    p.add_argument("--limit-train", type=int, metavar="N", help="use only the first N training images (quick runs)")
    p.add_argument("--limit-test", type=int, metavar="N", help="use only the first N test images (quick runs)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run where it stopped, with the options it was "
                   "started with (bit-exact: same final weights as an uninterrupted run)")
    p.add_argument("--no-plots", action="store_true", help="skip drawing the pictures")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from . import distributed
    from .data import load_mnist
    from .plots import plot_run
    from .training import copy_model, make_config, resume_options, train, train_ensemble, train_final, write_run_options

    overrides = {
        key: getattr(args, key)
        for key in ("model", "epochs", "batch_size", "lr", "optimizer", "weight_decay", "schedule", "label_smoothing",
                    "ema_decay", "augment", "val_size", "seed", "device", "limit_train", "limit_test", "early_stop",
                    "ensemble_size", "tta", "threads")
    }
    final = args.final
    if args.resume:
        config, saved_final = resume_options(args.resume, recipe=args.recipe, **overrides)
        final = final or saved_final
    else:
        config = make_config(args.recipe or "seed", **overrides)
    run_dir = Path(args.resume or args.out or Path("runs") / config.recipe)
    data = load_mnist(args.data_dir)
    if not args.resume and (config.ensemble_size > 1 or final) and distributed.is_main_process():
        write_run_options(run_dir, config, final)
    if config.ensemble_size > 1:
        ensemble = train_ensemble(config, data, run_dir, resume=bool(args.resume), progress=_progress(args),
                                  final=final)
        m = ensemble.metrics["ensemble"]
        print(f"Ensemble of {config.ensemble_size}: Test Loss: {m['loss']:.4f}, Test Acc: {100 * m['accuracy']:.2f}% "
              f"({m['count'] - m['errors']}/{m['count']}) in {ensemble.seconds:.1f}s")
        if "ensemble_tta" in ensemble.metrics:
            print(f"Ensemble + TTA: Test Acc: {100 * ensemble.metrics['ensemble_tta']['accuracy']:.2f}%")
        if args.save:
            copy_model(run_dir, args.save)
        print(f"run directory: {run_dir} (members in {run_dir}/member*)" + (f"; model saved to {args.save}" if args.save else ""))
        return 0
    trainer = train_final if final else train
    try:  # under torchrun every rank trains; only rank 0 reports, draws and copies
        result = trainer(config, data, run_dir, resume=bool(args.resume), progress=_progress(args))
    finally:
        distributed.shutdown()
    if not distributed.is_main_process():
        return 0
    m = result.metrics
    print(f"Test Loss: {m['loss']:.4f}, Test Acc: {100 * m['accuracy']:.2f}% "
          f"({m['count'] - m['errors']}/{m['count']}) in {result.seconds:.1f}s")
    if not args.no_plots:
        plot_run(run_dir, args.data_dir)
    if args.save:
        copy_model(run_dir, args.save)
    print(f"run directory: {run_dir}" + (f"; model saved to {args.save}" if args.save else ""))
    return 0


# --------------------------------------------------------------------------- evaluate / plot / models / download


def add_evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="test-set loss, accuracy, calibration (ECE, NLL), per-class precision/recall, "
                       "confusion matrix")
    _add_checkpoint(p)
    _add_data_dir(p)
    _add_backend(p)
    p.add_argument("--batch-size", type=_positive_int, default=1000, help="images per forward pass (default: 1000)")
    p.add_argument("--json", action="store_true", help="print one JSON object; `accuracy` and `ece` (15 bins) are "
                   "fractions in [0, 1], `nll` in nats")
    p.add_argument("--limit-test", type=int, metavar="N", help="use only the first N test images")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .backends import load_backend
    from .data import load_split
    from .evaluate import evaluate, format_report

    checkpoint, _ = _checkpoint(args)
    backend = load_backend(checkpoint, args.backend)
    images, labels = load_split("test", args.data_dir)
    if args.limit_test:
        images, labels = images[: args.limit_test], labels[: args.limit_test]
    metrics = evaluate(backend, images, labels, args.batch_size, progress=_progress(args))
    if args.json:
        print(json.dumps({"checkpoint": str(checkpoint), "model": backend.model_name, "backend": backend.name, **metrics}))
    else:
        print(f"{checkpoint} ({backend.model_name}, {backend.name} backend) on {len(labels)} test images")
        print(format_report(metrics))
    return 0


def add_calibrate_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="fit a checkpoint's temperature on held-out training images (never the test set)",
                       description="Temperature scaling: fit T so that softmax(logits / T) has the least NLL on held-out "
                                   "training images, and store it in the checkpoint; every command then shows calibrated "
                                   "probabilities. By default the checkpoint's own validation split is used (it was "
                                   "trained with --val-size). See docs/calibration.md.")
    p.add_argument("checkpoint", help="a .pth checkpoint")
    p.add_argument("-o", "--out", metavar="OUT", help="write the calibrated checkpoint here (default: replace CHECKPOINT)")
    _add_data_dir(p)
    p.add_argument("--val-size", type=_positive_int, help="held-out training images to fit on (default: the checkpoint's "
                   "own --val-size)")
    p.add_argument("--split-seed", type=int, help="seed of the held-out split (default: the checkpoint's, 0)")
    p.add_argument("--from", dest="source", metavar="CKPT", help="copy the temperature of CKPT, a calibrated model of "
                   "the same recipe trained with --val-size (for models trained on all 60,000 images)")
    p.add_argument("--allow-seen", action="store_true", help="fit on images the model was trained on (biased: "
                   "over-confident on new images)")
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate_checkpoint, describe

    record = calibrate_checkpoint(args.checkpoint, args.out, args.data_dir, args.val_size, args.split_seed,
                                  args.allow_seen, args.source)
    print(f"{args.out or args.checkpoint}: {describe(record)}")
    return 0


def add_plot_parser(sub) -> None:
    p = sub.add_parser("plot", help="(re)draw the pictures of a run directory")
    p.add_argument("run_dir", help="a run directory written by `mnistrec train`")
    _add_data_dir(p)
    p.set_defaults(func=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    from .plots import plot_run

    for path in plot_run(args.run_dir, args.data_dir):
        print(path)
    return 0


def add_models_parser(sub) -> None:
    p = sub.add_parser("models", help="list the models with parameter counts and FLOPs per image")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    from .models import describe_models

    rows = describe_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<14}{'parameters':>12}{'MFLOPs/img':>12}  description")
    for r in rows:
        print(f"{r['name']:<14}{r['parameters']:>12,}{r['flops'] / 1e6:>12.2f}  {r['description']}")
    return 0


def add_download_parser(sub) -> None:
    from .data import MIRRORS

    p = sub.add_parser("download", help="download and verify the MNIST files")
    _add_data_dir(p)
    p.add_argument("--mirror", action="append", metavar="URL",
                   help=f"base URL to try (repeatable; default: {', '.join(MIRRORS)})")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per connection (default: 30)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_download)


def cmd_download(args: argparse.Namespace) -> int:
    from .data import MIRRORS, download

    directory = download(args.data_dir, tuple(args.mirror or MIRRORS), timeout=args.timeout, progress=_progress(args),
                         log=lambda message: print(message, file=sys.stderr))
    print(f"MNIST is ready in {directory}")
    return 0


# --------------------------------------------------------------------------- export


def add_export_parser(sub) -> None:
    from .export import FORMATS, OPSET

    p = sub.add_parser("export", help="export a checkpoint to ONNX or TorchScript (checked against PyTorch)",
                       description="Export a checkpoint. The exported model takes float32 [N, 1, 28, 28] pixels in [0, 1] "
                                   "(ink = 1) and returns [N, 10] calibrated logits; the MNIST normalisation and the "
                                   "checkpoint's temperature are inside it.")
    _add_checkpoint(p)
    p.add_argument("--format", choices=FORMATS, default="onnx", help="onnx (dynamic batch axis) or torchscript (default: onnx)")
    p.add_argument("-o", "--out", metavar="OUT", help="output file (default: the checkpoint name with .onnx or .pt; "
                   "for the shipped model mnistrec-default.onnx/.pt in the current folder)")
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default: {OPSET})")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_checkpoint

    from .export import SUFFIXES

    checkpoint, is_default = _checkpoint(args)
    out = args.out or (Path("mnistrec-default").with_suffix(SUFFIXES[args.format]) if is_default else None)
    out = export_checkpoint(checkpoint, args.format, out, args.opset)
    print(f"{args.format} model written to {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0



# --------------------------------------------------------------------------- serve


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="the web app (draw a digit) and the HTTP API, on uvicorn",
                       description="Serve the drawing page at / and the HTTP API (/api, /v2, /docs) for one checkpoint.")
    _add_checkpoint(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only; "
                   "0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--allowed-host", action="append", metavar="NAME",
                   help="also answer requests whose Host header is NAME (repeatable; '*.example.com' for subdomains, "
                        "'*' for any). By default only 127.0.0.1, localhost, [::1] and the --host address are "
                        "answered; any other Host gets 400 (a defence against DNS rebinding)")
    p.add_argument("--workers", type=int, default=1, help="worker processes, each with its own model (default: 1)")
    p.add_argument("--max-request-mb", type=float, default=10.0, help="largest request body in MiB (default: 10; 413 above)")
    p.add_argument("--max-batch", type=int, default=64, help="most images per request (default: 64)")
    p.add_argument("--model-name", default="mnistrec", help="model name in the /v2 protocol (default: mnistrec)")
    _add_backend(p, onnx_files=False)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .serve.app import create_app
    except ImportError as exc:
        raise MnistrecError(f"serving needs the 'serve' extra (pip install 'mnistrec[serve]'): {exc}") from None
    from .serve.hosts import default_allowed_hosts
    from .serve.service import MAX_BATCH_LIMIT

    if args.workers < 1 or not 0 < args.port < 65536 or not 1 <= args.max_batch <= MAX_BATCH_LIMIT or args.max_request_mb <= 0:
        raise MnistrecError(f"--workers must be >= 1, --max-batch in 1..{MAX_BATCH_LIMIT}, --port in 1..65535, "
                            "--max-request-mb > 0")
    allowed_hosts = default_allowed_hosts(args.host, args.allowed_host or [])
    settings = {"max_request_bytes": int(args.max_request_mb * 1024 * 1024), "max_batch_images": args.max_batch,
                "model_name": args.model_name, "backend": args.backend, "allowed_hosts": allowed_hosts}
    checkpoint, _ = _checkpoint(args)
    app = create_app(checkpoint, **settings)  # fails here, with one line, on a bad checkpoint
    print(f"mnistrec: serving {checkpoint} on http://{args.host}:{args.port}/ (API docs at /docs; Host names answered: "
          f"{', '.join(allowed_hosts)}; add others with --allowed-host)", file=sys.stderr)
    if args.workers == 1:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
        return 0
    # Several processes need an import string; each worker builds its own app from these variables.
    os.environ.update({"MNISTREC_SERVE_CHECKPOINT": str(checkpoint.resolve()),
                       "MNISTREC_SERVE_MAX_REQUEST_BYTES": str(settings["max_request_bytes"]),
                       "MNISTREC_SERVE_MAX_BATCH": str(args.max_batch), "MNISTREC_SERVE_MODEL_NAME": args.model_name,
                       "MNISTREC_SERVE_BACKEND": args.backend, "MNISTREC_SERVE_ALLOWED_HOSTS": ",".join(allowed_hosts)})
    del app
    uvicorn.run("mnistrec.serve.app:create_app_from_env", factory=True, host=args.host, port=args.port,
                workers=args.workers, log_level="warning")
    return 0


# --------------------------------------------------------------------------- predict


def add_predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="predict the digit (or number) in your own image files and folders",
                       description="Predict digits in image files (PNG, JPEG, BMP, GIF, WebP, TIFF) and folders. "
                                   "Each image is preprocessed the way MNIST was made (see the README). A file that "
                                   "cannot be read gets one line on stderr; the others are still predicted; the exit "
                                   "code is 1 when some files failed, 2 when none could be predicted.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders (a first argument ending in "
                   ".pth, .pt or .onnx is the checkpoint, as in `mnistrec predict CKPT IMAGE...`)")
    _add_checkpoint(p, positional=False)
    p.add_argument("--top-k", type=int, default=3, metavar="K", help="how many most likely digits to list (default: 3)")
    p.add_argument("--json", action="store_true", help='print JSON Lines: {"path", "digit", "confidence", "probabilities", "top_k"}')
    p.add_argument("--recursive", "-r", action="store_true", help="also look for images in the sub-folders of folders")
    p.add_argument("--invert", choices=["auto", "yes", "no"], default="auto",
                   help="dark ink on light paper is inverted: auto-detected (default), always (yes) or never (no)")
    p.add_argument("--multi", action="store_true", help='read a number of several digits, left to right: {"path", "number", "digits": [...]}')
    p.add_argument("--save-preprocessed", metavar="DIR", help="write the 28×28 images the model saw into DIR as PNG")
    p.add_argument("--explain", metavar="OUT.png", help="draw input, preprocessed image, probabilities and an occlusion "
                                                          "saliency map (first 12 images or digits)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_backend(p)
    p.set_defaults(func=cmd_predict)


def _format_prediction(result: dict) -> str:
    top = ", ".join(f"{t['digit']} {100 * t['probability']:.1f}%" for t in result["top_k"])
    return f"{result['digit']:>6}  {100 * result['confidence']:>9.1f}%  {top}"


def cmd_predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .backends import load_backend
    from .predict import expand_paths, predict_files, save_preprocessed

    if args.top_k < 1:
        raise MnistrecError(f"--top-k must be at least 1, not {args.top_k}")
    if args.checkpoint_opt is None and Path(args.paths[0]).suffix.lower() in MODEL_SUFFIXES:
        args.checkpoint_opt, args.paths = args.paths[0], args.paths[1:]
        if not args.paths:
            raise MnistrecError(f"no image given after the checkpoint {args.checkpoint_opt}")
    checkpoint, _ = _checkpoint(args)
    backend = load_backend(checkpoint, args.backend)
    paths = expand_paths(args.paths, args.recursive)
    if not paths:
        raise MnistrecError(f"no image files found in {', '.join(args.paths)}" + ("" if args.recursive else " (try --recursive)"))
    bar = tqdm(total=len(paths), unit="file", file=sys.stderr, disable=not _progress(args) or len(paths) < 20)
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
            digits = ", ".join(f"{d['digit']} ({100 * d['confidence']:.0f}%)" for d in result["digits"])
            print(f"{str(item.path):<{width}}  {result['number']:>6}  {digits}")
        else:
            print(f"{str(item.path):<{width}}  {_format_prediction(result)}")
        if args.save_preprocessed:
            save_preprocessed(item, args.save_preprocessed)
        if args.explain and len(explained) < 12:
            explained.append(item)
    bar.close()
    if args.explain:
        from .plots import explain_figure
        from .predict import explain_rows

        if explained:
            print(f"explanation: {explain_figure(explain_rows(backend, explained, limit=12), Path(args.explain))}", file=sys.stderr)
        else:
            print("mnistrec: error: --explain: no image could be predicted, nothing to draw", file=sys.stderr)
    if failed and len(paths) > 1:  # one file: its own error line says it all
        print(f"mnistrec: {failed} of {len(paths)} file(s) failed", file=sys.stderr)
    # No file predicted is a user mistake like a bad option (exit 2); some failed among good ones is exit 1.
    return 2 if failed == len(paths) else 1 if failed else 0


# --------------------------------------------------------------------------- entry point

PARSERS = [add_train_parser, add_evaluate_parser, add_calibrate_parser, add_plot_parser, add_predict_parser, add_serve_parser,
           add_export_parser, add_models_parser, add_download_parser]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="mnistrec", description="Handwritten-digit recognition with PyTorch.")
    parser.add_argument("--version", action="version", version=f"mnistrec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in PARSERS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MnistrecError as exc:
        print(f"mnistrec: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `mnistrec ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
