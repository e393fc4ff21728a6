"""``mnistrec finetune``: adapt a trained model to labelled image folders (the work is in :mod:`mnistrec.finetune_run`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import MnistrecError
from .common import add_checkpoint, add_data_dir, checkpoint_path, positive_int, progress


def add_finetune_parser(sub) -> None:
    from ..finetune import USER_AUGMENTS, FinetuneConfig

    d = FinetuneConfig()
    p = sub.add_parser("finetune", help="adapt a trained model to your own labelled images (a few per digit are enough)",
                       description="Fine-tune a model on labelled images: IMAGES/0/*.png ... IMAGES/9/*.png (any format "
                                   "predict reads) or a CSV of path,label. MNIST is replayed so its accuracy holds; the "
                                   "result is an ordinary checkpoint, RUN_DIR/model.pth. See docs/finetune.md.")
    p.add_argument("--images", metavar="DIR", help="folder with sub-folders 0 to 9, or a CSV file of path,label")
    add_checkpoint(p, positional=False)
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (default: runs/finetune)")
    add_data_dir(p)
    p.add_argument("--steps", type=positive_int, help=f"optimiser steps (default: {d.steps})")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default: {d.lr})")
    p.add_argument("--user-fraction", type=float, help=f"share of each batch taken from your images (default: {d.user_fraction})")
    p.add_argument("--augment", choices=list(USER_AUGMENTS), help=f"augmentation of your images (default: {d.augment})")
    p.add_argument("--seed", type=int, help=f"random seed (default: {d.seed})")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for PyTorch (default: PyTorch's choice)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted fine-tuning run with the options it was started with")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args: argparse.Namespace) -> int:
    import dataclasses

    from ..finetune import FinetuneConfig
    from ..finetune_run import read_options, run_finetune

    overrides = {k: getattr(args, k) for k in ("steps", "lr", "user_fraction", "augment", "seed", "threads")
                 if getattr(args, k) is not None}
    if args.resume:
        if args.images or args.checkpoint_opt or args.out or overrides:
            raise MnistrecError("--resume takes the options the run was started with; give only --resume RUN_DIR")
        saved = read_options(Path(args.resume))
        fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
        config = FinetuneConfig(**{k: v for k, v in saved["config"].items() if k in fields})
        checkpoint, images, run_dir = saved["checkpoint"], saved["images"], Path(args.resume)
    else:
        if not args.images:
            raise MnistrecError("--images DIR is required: a folder with sub-folders 0 to 9, or a CSV of path,label")
        config = FinetuneConfig(**overrides)
        checkpoint, images, run_dir = checkpoint_path(args)[0], args.images, Path(args.out or "runs/finetune")
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731 - progress lines, not results
    result = run_finetune(checkpoint, images, run_dir, config, args.data_dir, resume=bool(args.resume),
                          progress=progress(args), log=log)
    print(result.model_path)
    return 0
