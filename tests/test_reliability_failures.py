"""Failing disks, read-only folders, missing data and exploding losses: one clear line,
exit 2, and the checkpoint that was there before is still there byte for byte.

The full disk is real: the training subprocess runs under ``RLIMIT_FSIZE`` (with
SIGXFSZ ignored), so the kernel fails its writes with EFBIG exactly where a full disk
fails them with ENOSPC. The read-only folder is real too: ``chmod`` does not stop
root, so as root the folder is made immutable with ``chattr +i`` (which does);
otherwise it is ``chmod 0555``.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import cli_env
from mnistrec.checkpoint import load_checkpoint, save_checkpoint
from mnistrec.cli import main

ENV = {"OMP_NUM_THREADS": "1"}
TINY = ["--epochs", "1", "--limit-train", "300", "--limit-test", "50", "--no-plots", "--save", ""]
FILES = ("last.pth", "model.pth", "metrics.json", "history.csv")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, mnist) -> Path:
    """A completed tiny run directory (trained in-process)."""
    from mnistrec.train import make_config, train

    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train(make_config("seed", epochs=1, limit_train=300, limit_test=50), mnist, run_dir, progress=False, log=lambda _: None)
    return run_dir


def _copy(run_dir: Path, tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target, {name: (target / name).read_bytes() for name in FILES}


def _assert_intact(run_dir: Path, before: dict[str, bytes]) -> None:
    for name, data in before.items():
        assert (run_dir / name).read_bytes() == data, f"{name} changed"
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(before), "leftover temporary files"
    load_checkpoint(run_dir / "model.pth")
    load_checkpoint(run_dir / "last.pth")


def _one_line_error(stderr: str) -> str:
    assert stderr.startswith("mnistrec: error: ") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr
    return stderr


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(finished_run, tmp_path, data_dir):
    run_dir, before = _copy(finished_run, tmp_path)
    # A new run into the same folder; every file over 1 MB fails mid-write (checkpoints are 2-6 MB).
    result = subprocess.run(
        [sys.executable, "-m", "mnistrec", "train", "--out", str(run_dir), *TINY], cwd=tmp_path,
        env=cli_env(MNIST_DATA_DIR=str(data_dir), XDG_CACHE_HOME=str(tmp_path / "cache"), **ENV),
        capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size(1_000_000),
    )
    assert result.returncode == 2, result.stderr
    message = _one_line_error(result.stderr)
    assert f"cannot write {run_dir / 'last.pth'}: File too large" in message and "unchanged" in message
    _assert_intact(run_dir, before)
    # The decoded-data cache (47 MB of images) could not be written either: no partial file left behind.
    cached = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert not [name for name in cached if name.endswith(".tmp") or "train-" in name and "images" in name], cached


class ReadOnly:
    """Make a directory really read-only, for root too (chattr +i), and undo it afterwards."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> Path:
        if os.geteuid() == 0:
            done = subprocess.run(["chattr", "+i", str(self.path)], capture_output=True, text=True)
            assert done.returncode == 0, f"root ignores chmod and chattr +i failed here: {done.stderr.strip()}"
        else:
            self.path.chmod(0o555)
        probe = self.path / "probe"
        with pytest.raises(OSError):
            probe.write_bytes(b"x")
        return self.path

    def __exit__(self, *exc) -> None:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(self.path)], check=True)
        else:
            self.path.chmod(0o755)


def test_read_only_run_directory_fails_before_training_and_loses_nothing(finished_run, tmp_path, data_dir, capsys, monkeypatch):
    monkeypatch.setenv("MNIST_DATA_DIR", str(data_dir))
    run_dir, before = _copy(finished_run, tmp_path)
    with ReadOnly(run_dir):
        for argv in (["train", "--out", str(run_dir), *TINY], ["train", "--resume", str(run_dir), "--no-plots", "--save", ""]):
            assert main(argv) == 2
            message = _one_line_error(capsys.readouterr().err)
            assert f"cannot write to run directory {run_dir}" in message
        # Writing a checkpoint there directly: one line, the old file untouched.
        model = load_checkpoint(run_dir / "model.pth").model
        with pytest.raises(Exception) as info:
            save_checkpoint(run_dir / "model.pth", "mlp", {}, model)
        assert type(info.value).__name__ == "MnistrecError" and "cannot write" in str(info.value)
        _assert_intact(run_dir, before)
    _assert_intact(run_dir, before)


def test_missing_or_broken_data_is_one_line_and_keeps_the_run(finished_run, tmp_path, data_dir, capsys):
    run_dir, before = _copy(finished_run, tmp_path)
    partial = tmp_path / "partial-data"
    partial.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        shutil.copy(data_dir / name, partial / name)
    truncated = tmp_path / "truncated-data"
    shutil.copytree(partial, truncated)
    shutil.copy(data_dir / "t10k-labels-idx1-ubyte.gz", truncated)
    images = (data_dir / "t10k-images-idx3-ubyte.gz").read_bytes()
    (truncated / "t10k-images-idx3-ubyte.gz").write_bytes(images[: len(images) // 3])
    cases = {
        tmp_path / "no-such-dir": "does not exist",
        partial: "t10k-labels-idx1-ubyte",
        truncated: "t10k-images-idx3-ubyte.gz",
    }
    for bad, phrase in cases.items():
        for argv in (["train", "--resume", str(run_dir), "--data-dir", str(bad), "--no-plots", "--save", ""],
                     ["evaluate", str(run_dir / "model.pth"), "--data-dir", str(bad)]):
            assert main(argv) == 2
            message = _one_line_error(capsys.readouterr().err)
            assert phrase in message, message
    _assert_intact(run_dir, before)


def test_exploding_loss_stops_with_the_learning_rate_and_keeps_the_last_good_epoch(tmp_path, data_dir, capsys, monkeypatch):
    # Plain SGD at lr 100 on 256 images: epoch 1 ends with finite weights, epoch 2 diverges to NaN.
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "mnistrec", "train", "--out", str(run_dir), "--optimizer", "sgd", "--lr", "100", "--epochs", "3",
         "--limit-train", "256", "--limit-test", "50", "--batch-size", "64", "--no-plots", "--save", ""],
        cwd=tmp_path, env=cli_env(MNIST_DATA_DIR=str(data_dir), **ENV), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr
    message = _one_line_error(result.stderr)
    assert "at epoch 2" in message and "with learning rate 100;" in message and "lower --lr" in message
    assert f"the last good checkpoint {run_dir / 'last.pth'} is kept" in message
    assert "Epoch 1/3" in result.stdout
    state = torch.load(run_dir / "last.pth", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values())
    assert load_checkpoint(run_dir / "last.pth").model_name == "mlp"
    assert not (run_dir / "model.pth").exists()

    # An absurd learning rate blows up in the first epoch: the same one line, nothing written.
    monkeypatch.setenv("MNIST_DATA_DIR", str(data_dir))
    fresh = tmp_path / "fresh"
    assert main(["train", "--out", str(fresh), "--lr", "1e30", *TINY]) == 2
    message = _one_line_error(capsys.readouterr().err)
    assert "at epoch 1" in message and "with learning rate 1e+30;" in message
    assert not (fresh / "last.pth").exists()
