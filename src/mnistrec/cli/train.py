"""``mnistrec train`` (and ``plot``, which redraws a run's pictures)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import MnistrecError
from .common import add_data_dir, progress

if TYPE_CHECKING:
    from ..data import MNIST


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``mnistrec train`` and its options on ``sub``."""
    from ..training import RECIPES, TrainConfig, recipe_names

    defaults = TrainConfig()
    p = sub.add_parser("train", help="train a recipe and write a run directory",
                       description="Train a model. The recipe sets every option; flags override single values.")
    p.add_argument("--recipe", choices=recipe_names(), help="named set of options (default: seed, the original notebook)")
    add_data_dir(p)
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
    p.add_argument("--no-test", action="store_true", help="a selection run: never evaluate on the test set (the "
                   "validation split reports; needs --val-size; no test-set pictures). Look at the test set once, at the end")
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
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"], help="bf16: train under bfloat16 autocast (faster "
                   "on CPUs with native bfloat16: AVX512-BF16 or AMX; weights and evaluation stay float32); auto: bf16 "
                   "on such a CPU, else fp32 (seed: fp32; fast, best, ensemble: auto)")
    p.add_argument("--seed", type=int, help=f"random seed; same seed and machine give the same metrics (default: {defaults.seed})")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="where to train (default: auto)")
    p.add_argument("--limit-train", type=int, metavar="N", help="use only the first N training images (quick runs)")
    p.add_argument("--limit-test", type=int, metavar="N", help="use only the first N test images (quick runs)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run where it stopped, with the options it was "
                   "started with (bit-exact: same final weights as an uninterrupted run)")
    p.add_argument("--images", metavar="DIR", help="train on labelled images instead of MNIST: DIR/0/*.png ... DIR/9/*.png "
                   "or a CSV of path,label (give it again with --resume); the test set stays MNIST's")
    p.add_argument("--with-mnist", action="store_true", help="with --images: train on those images and MNIST's together")
    p.add_argument("--no-plots", action="store_true", help="skip drawing the pictures")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The training options given on the command line (``None`` where a flag was not given: the recipe's value)."""
    return {
        key: getattr(args, key)
        for key in ("model", "epochs", "batch_size", "lr", "optimizer", "weight_decay", "schedule", "label_smoothing",
                    "ema_decay", "augment", "val_size", "seed", "device", "limit_train", "limit_test", "early_stop",
                    "ensemble_size", "tta", "threads", "precision")
    }


def cmd_train(args: argparse.Namespace) -> int:
    """Run ``mnistrec train`` with the parsed ``args``; returns the exit code."""
    from .. import distributed
    from ..plots import plot_run
    from ..training import copy_model, make_config, resume_options, train, train_ensemble, train_final, write_run_options

    overrides = config_overrides(args)
    final = args.final
    if args.resume:
        config, saved_final = resume_options(args.resume, recipe=args.recipe, **overrides)
        final = final or saved_final
    else:
        config = make_config(args.recipe or "seed", **overrides)
    run_dir = Path(args.resume or args.out or Path("runs") / config.recipe)
    if args.with_mnist and not args.images:
        raise MnistrecError("--with-mnist needs --images DIR")
    if args.no_test and (not config.val_size or config.ensemble_size > 1 or final):
        raise MnistrecError("--no-test is for a single run with a validation split (--val-size N, no --final, "
                            "no ensemble): the validation split reports instead of the test set")
    data = _training_data(args)
    _import_optimiser_machinery()
    # Every rank of a torchrun ensemble records the options: it resumes its own members from its own disk.
    if not args.resume and (config.ensemble_size > 1 or final and distributed.is_main_process()):
        write_run_options(run_dir, config, final)
    if config.ensemble_size > 1:
        try:  # under torchrun the ranks share the members out; rank 0 alone reports and copies
            ensemble = train_ensemble(config, data, run_dir, resume=bool(args.resume), progress=progress(args),
                                      final=final)
        finally:
            distributed.shutdown()
        if ensemble is None:
            return 0
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
        result = trainer(config, data, run_dir, resume=bool(args.resume), progress=progress(args),
                         evaluate_test=not args.no_test)
    finally:
        distributed.shutdown()
    if not distributed.is_main_process():
        return 0
    m = result.metrics
    if args.no_test:  # the run kept its best validation epoch: that epoch's validation figures
        best = next(row for row in result.history if int(row["epoch"]) == result.best_epoch)
        print(f"Validation Loss: {best['val_loss']:.4f}, Validation Acc: {100 * best['val_accuracy']:.2f}% "
              f"(epoch {result.best_epoch}; the test set was not evaluated) in {result.seconds:.1f}s")
    else:
        print(f"Test Loss: {m['loss']:.4f}, Test Acc: {100 * m['accuracy']:.2f}% "
              f"({m['count'] - m['errors']}/{m['count']}) in {result.seconds:.1f}s")
    if not args.no_plots and not args.no_test:  # the pictures show the test set
        plot_run(run_dir, args.data_dir)
    if args.save:
        copy_model(run_dir, args.save)
    print(f"run directory: {run_dir}" + (f"; model saved to {args.save}" if args.save else ""))
    return 0


def add_plot_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``mnistrec plot`` and its options on ``sub``."""
    p = sub.add_parser("plot", help="(re)draw the pictures of a run directory")
    p.add_argument("run_dir", help="a run directory written by `mnistrec train`")
    add_data_dir(p)
    p.set_defaults(func=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    """Run ``mnistrec plot`` with the parsed ``args``; returns the exit code."""
    from ..plots import plot_run

    for path in plot_run(args.run_dir, args.data_dir):
        print(path)
    return 0


def _training_data(args: argparse.Namespace) -> MNIST:
    """MNIST, or the ``--images`` folder (with ``--with-mnist``, both)."""
    from ..data import load_mnist

    data = load_mnist(args.data_dir)
    if args.images:
        from ..folders import load_labelled_images, training_data

        folder = load_labelled_images(args.images, on_skip=lambda path, why: print(f"mnistrec: skipped {path}: {why}",
                                                                                   file=sys.stderr))
        data = training_data(data, folder, args.with_mnist)
        print(f"training on {len(folder)} images from {args.images}" + (" and MNIST's training images" if args.with_mnist else ""),
              file=sys.stderr)
    return data


def _import_optimiser_machinery() -> None:
    """Pay a one-time library import now, before ``train()`` starts the training clock (metrics.json "seconds").

    The first optimiser a process builds makes torch import ``torch._dynamo``
    (``Optimizer.add_param_group`` is wrapped in ``torch._disable_dynamo``, which
    imports it on its first call): about 1 s here. That is start-up, like
    ``import torch``; the process's wall-clock still includes it
    (docs/accuracy-and-selection.md).
    """
    import torch._dynamo  # noqa: F401
