"""``mnistrec download``: fetch and verify the MNIST files."""

from __future__ import annotations

import argparse
import sys

from .common import add_data_dir, progress


def add_download_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``mnistrec download`` and its options on ``sub``."""
    from ..data import MIRRORS

    p = sub.add_parser("download", help="download and verify the MNIST files")
    add_data_dir(p)
    p.add_argument("--mirror", action="append", metavar="URL",
                   help=f"base URL to try (repeatable; default: {', '.join(MIRRORS)})")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per connection (default: 30)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_download)


def cmd_download(args: argparse.Namespace) -> int:
    """Run ``mnistrec download`` with the parsed ``args``; returns the exit code."""
    from ..data import MIRRORS, download

    directory = download(args.data_dir, tuple(args.mirror or MIRRORS), timeout=args.timeout, progress=progress(args),
                         log=lambda message: print(message, file=sys.stderr))
    print(f"MNIST is ready in {directory}")
    return 0
