"""Options and helpers shared by several commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import MnistrecError


def add_data_dir(parser: argparse.ArgumentParser) -> None:
    """``--data-dir DIR``: where the MNIST files are."""
    parser.add_argument("--data-dir", metavar="DIR", help="folder with the four MNIST IDX files, gzip or raw "
                        "(default: $MNIST_DATA_DIR, else ~/.cache/mnistrec/mnist)")


def add_backend(parser: argparse.ArgumentParser, onnx_files: bool = True) -> None:
    """``--backend auto|torch|onnx`` (see :mod:`mnistrec.backends`)."""
    what = "takes an .onnx export, or exports a .pth in memory" if onnx_files else "on the checkpoint exported in memory"
    parser.add_argument("--backend", choices=["auto", "torch", "onnx"], default="auto",
                        help=f"inference engine: onnxruntime ({what}; the export is cached), PyTorch, or auto (default): "
                             "onnxruntime for CNNs when installed, PyTorch for the MLP")


#: A first positional argument with one of these endings is a checkpoint (the form before the shipped default model).
MODEL_SUFFIXES = (".pth", ".pt", ".onnx")


def add_checkpoint(parser: argparse.ArgumentParser, positional: bool = True) -> None:
    """``-c/--checkpoint FILE`` and, for the older form, an optional positional checkpoint."""
    what = "a .pth checkpoint (ours, or a seed-style bare state_dict), or an exported .onnx with --backend onnx"
    if positional:
        parser.add_argument("checkpoint", nargs="?", help=f"{what} (default: the shipped model)")
    parser.add_argument("-c", "--checkpoint", dest="checkpoint_opt", metavar="FILE",
                        help=f"{what} (default: the model shipped with mnistrec)")


def checkpoint_path(args: argparse.Namespace) -> tuple[Path, bool]:
    """``(path, is_default)``: the checkpoint named by ``-c``, positionally, or else the shipped default model."""
    from ..checkpoint import default_checkpoint

    named = [c for c in (getattr(args, "checkpoint", None), args.checkpoint_opt) if c]
    if len(named) > 1:
        raise MnistrecError("give the checkpoint once: either positionally or with --checkpoint")
    return (Path(named[0]), False) if named else (default_checkpoint(), True)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def progress(args: argparse.Namespace) -> bool:
    """Whether to show progress bars."""
    # tqdm bars only for a person watching a terminal.
    return not getattr(args, "quiet", False) and sys.stderr.isatty()
