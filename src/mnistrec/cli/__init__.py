"""Command-line interface: argument parsing only; the work is done by the modules it calls.

Every sub-command is a ``cmd_*`` function taking the parsed arguments and
returning an exit code. User mistakes (:class:`MnistrecError`) print one line on
stderr and exit 2; Ctrl-C exits 130. One module per group of commands:
:mod:`~mnistrec.cli.train` (train, plot), :mod:`~mnistrec.cli.model` (evaluate,
calibrate, export, models), :mod:`~mnistrec.cli.predict`, :mod:`~mnistrec.cli.serve`,
:mod:`~mnistrec.cli.download`, :mod:`~mnistrec.cli.finetune`; shared options in :mod:`~mnistrec.cli.common`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from ..errors import MnistrecError
from .download import add_download_parser
from .finetune import add_finetune_parser
from .model import add_calibrate_parser, add_evaluate_parser, add_export_parser, add_models_parser
from .predict import add_predict_parser
from .serve import add_serve_parser
from .train import add_plot_parser, add_train_parser

PARSERS = [add_train_parser, add_evaluate_parser, add_calibrate_parser, add_plot_parser, add_predict_parser, add_serve_parser,
           add_export_parser, add_finetune_parser, add_models_parser, add_download_parser]


def build_parser() -> argparse.ArgumentParser:
    """The ``mnistrec`` parser with every sub-command."""
    from .. import __version__

    parser = argparse.ArgumentParser(prog="mnistrec", description="Handwritten-digit recognition with PyTorch.")
    parser.add_argument("--version", action="version", version=f"mnistrec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in PARSERS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mnistrec ARGV``; returns the exit code."""
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
