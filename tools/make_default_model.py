"""Turn a trained run into the model shipped inside the package (``make default-model`` runs this).

    python tools/make_default_model.py RUN_DIR/model.pth [--out src/mnistrec/default_model.pth]

The run must have been trained with a validation split (``--val-size``): its
temperature is fitted there (never on the test set), then the calibrated model is
evaluated once on the MNIST test set and those numbers are recorded in the file
(``metrics``: accuracy, ece, nll, ...; ``calibration``; plus what training
recorded: recipe, config with its seed, data checksums, library versions).
tests/test_default_model.py checks that the file still scores what it records.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mnistrec.calibrate import calibrate_checkpoint, describe  # noqa: E402
from mnistrec.checkpoint import DEFAULT_MODEL, load_checkpoint, read_checkpoint  # noqa: E402
from mnistrec.data import load_split  # noqa: E402
from mnistrec.errors import MnistrecError  # noqa: E402
from mnistrec.evaluate import evaluate  # noqa: E402
from mnistrec.fileio import atomic_write  # noqa: E402

MAX_BYTES = 3_000_000
OUT = Path(__file__).resolve().parents[1] / "src" / "mnistrec" / DEFAULT_MODEL


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="model.pth of a run trained with --val-size")
    parser.add_argument("--out", default=str(OUT), help=f"where to write it (default: {OUT})")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    try:
        record = calibrate_checkpoint(args.checkpoint, out, args.data_dir)  # the run's own validation split
        print(f"calibrated: {describe(record)}")
        loaded = load_checkpoint(out)
        images, labels = load_split("test", args.data_dir)
        metrics = evaluate(loaded.inference_model, images, labels)
    except MnistrecError as exc:
        print(f"make_default_model: error: {exc}", file=sys.stderr)
        return 2
    keep = ("loss", "accuracy", "count", "errors", "ece", "nll")
    payload = read_checkpoint(out)
    payload["metrics"] = {k: metrics[k] for k in keep}
    payload["metrics_note"] = "MNIST test set, calibrated probabilities (temperature applied); measured once, after the choice"
    payload["shipped"] = {"command": "make default-model", "source": Path(args.checkpoint).as_posix(),
                          "choice": "docs/calibration.md#the-shipped-model"}
    atomic_write(out, lambda fh: torch.save(payload, fh))
    size = out.stat().st_size
    print(f"{out}: {size / 1e6:.2f} MB; test accuracy {100 * metrics['accuracy']:.2f}%, ECE {100 * metrics['ece']:.3f}%, "
          f"NLL {metrics['nll']:.4f}")
    if size > MAX_BYTES:
        print(f"make_default_model: error: {out} is {size} bytes, over the {MAX_BYTES}-byte budget", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
