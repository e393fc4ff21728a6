"""Shared fixtures: the real MNIST files, small real checkpoints, and a CLI runner.

Tests read MNIST from ``../shared/datasets/mnist`` (or ``$MNIST_DATA_DIR``). They
never download from the internet and never train for minutes: a few thousand
images are enough to prove that the code learns.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
SHARED_MNIST = REPO.parent / "shared" / "datasets" / "mnist"


def _data_dir() -> Path:
    if os.environ.get("MNIST_DATA_DIR"):
        return Path(os.environ["MNIST_DATA_DIR"])
    return SHARED_MNIST


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The directory with the four real MNIST .gz files."""
    path = _data_dir()
    if not (path / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"MNIST not found in {path}; set MNIST_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def mnist(data_dir):
    """The full data set as tensors (loaded once per session)."""
    from mnistrec.data import load_mnist

    return load_mnist(data_dir)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Keep decoded-data caches out of the user's home; one per session so loads stay fast.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Run ``python -m mnistrec ARGS`` in a real subprocess and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "mnistrec", *map(str, args)],
        cwd=cwd or REPO, env=cli_env(**env), capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="session")
def mlp_checkpoint(tmp_path_factory, mnist) -> Path:
    """A real mnistrec checkpoint of the seed MLP, trained for one epoch on 6,000 images (about 90% accurate)."""
    from mnistrec.train import make_config, train

    run_dir = tmp_path_factory.mktemp("mlp-run")
    train(make_config("seed", epochs=1, limit_train=6000, limit_test=1000), mnist, run_dir, progress=False, log=lambda _: None)
    return run_dir / "model.pth"
