"""The seed's script, kept working: ``python mnist_recognition.py`` trains the seed recipe.

A thin wrapper over the ``mnistrec`` package (it is ``mnistrec train``): the same
per-epoch lines as the original script, the pictures in ``runs/seed/`` and the
weights in ``mnist_model.pth``. Every ``mnistrec train`` flag is accepted, e.g.
``python mnist_recognition.py --epochs 1 --limit-train 3000``; see ``--help``.

Data comes from ``--data-dir``, else ``$MNIST_DATA_DIR``, else the project's shared
copy (``../shared/datasets/mnist``) when it exists, else ``~/.cache/mnistrec/mnist``,
which is downloaded first when it is empty (the seed let torchvision download too).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent

try:
    import mnistrec  # noqa: F401  (installed, e.g. by `make run`)
except ImportError:  # a plain checkout: use the source tree next to this file
    sys.path.insert(0, str(ROOT / "src"))


def main(argv: list[str] | None = None) -> int:
    from mnistrec.cli import main as cli
    from mnistrec.data import FILES, resolve_data_dir

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        return cli(["train", *argv])
    if not any(a == "--data-dir" or a.startswith("--data-dir=") for a in argv) and not os.environ.get("MNIST_DATA_DIR"):
        shared = ROOT.parent / "shared" / "datasets" / "mnist"
        data_dir = shared if shared.is_dir() else resolve_data_dir()
        if not all((data_dir / f"{name}.gz").is_file() or (data_dir / name).is_file() for name in FILES):
            status = cli(["download", "--data-dir", str(data_dir)])
            if status:
                return status
        argv = ["--data-dir", str(data_dir), *argv]
    return cli(["train", *argv])


if __name__ == "__main__":
    sys.exit(main())
