"""Resumable training, proved on real processes: SIGKILL and Ctrl-C in the middle of an
epoch, then ``mnistrec train --resume RUN_DIR`` must end with exactly the weights of a
run that was never interrupted (``torch.equal`` on every tensor).

The training subprocess writes its tqdm bar to a pseudo-terminal; the test reads the bar
to know that the process is inside epoch 2 (after epoch 1 was checkpointed) before it
sends the signal, so no sleep has to guess the timing and no test hook is needed.
The bar is redrawn at every step (``TQDM_MININTERVAL=0``, ``TQDM_MINITERS=1``) and is
1,000 columns wide, so the terminal's buffer (about 19 kB on Linux) holds at most a
few dozen redraws: the trainer cannot run more than that many steps ahead of what the
test has read before its writes block. Neither a fast machine (an epoch faster than
tqdm's default 0.1 s refresh) nor a loaded one (a slow reader) can make the signal
land outside epoch 2.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_cli, signal_inside_epoch

# One thread: bit-exactness compares runs with the same thread count (a different
# count changes the float summation order), and on a loaded 2-core machine one
# thread is also much faster than two spinning OpenMP threads.
ENV = {"OMP_NUM_THREADS": "1"}
# ~190 steps per epoch on 1,500 images: long enough to stop inside an epoch, quick to run.
SEED_OPTS = ["--epochs", "3", "--limit-train", "1500", "--limit-test", "100", "--batch-size", "8"]


def _recipe_opts() -> list[str]:
    """The seed MLP plus augmentation, a one-cycle schedule, a weight EMA and bfloat16 autocast (as the CNN recipes)."""
    try:
        from mnistrec.augment import get_augmentation  # noqa: F401  (issue 4)
    except ImportError:
        return []
    return ["--augment", "affine", "--schedule", "onecycle", "--ema-decay", "0.99", "--precision", "bf16"]


OPTION_SETS = {"seed": SEED_OPTS}
if _recipe_opts():
    OPTION_SETS["augment+onecycle+ema+bf16"] = SEED_OPTS + _recipe_opts()


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _assert_same_run(run_dir: Path, reference_dir: Path) -> None:
    """Final weights bit-exact, and the same per-epoch training losses, as the uninterrupted run."""
    weights, reference = _weights(run_dir / "model.pth"), _weights(reference_dir / "model.pth")
    assert weights.keys() == reference.keys()
    differ = [k for k in reference if not torch.equal(weights[k], reference[k])]
    assert not differ, f"weights differ from the uninterrupted run: {differ}"
    losses = [torch.load(d / "last.pth", weights_only=True)["history"] for d in (run_dir, reference_dir)]
    assert [row["train_loss"] for row in losses[0]] == [row["train_loss"] for row in losses[1]]


def _signal_inside_epoch(run_dir: Path, opts: list[str], cwd: Path, sig: int, epoch: int = 2) -> tuple[subprocess.CompletedProcess, tuple[int, int, int]]:
    """Start ``mnistrec train``, send ``sig`` once its progress bar shows ``epoch`` 5-60% done."""
    cmd = [sys.executable, "-m", "mnistrec", "train", "--out", str(run_dir), "--no-plots", "--save", "", *opts]
    return signal_inside_epoch(cmd, cwd, ENV, sig, epoch)


@pytest.fixture(scope="module", params=list(OPTION_SETS))
def option_set(request, tmp_path_factory, data_dir):
    """(name, options, run directory of an uninterrupted run with those options)."""
    opts = OPTION_SETS[request.param]
    cwd = tmp_path_factory.mktemp(f"ref-{request.param}")
    result = run_cli("train", "--out", cwd / "run", "--no-plots", "--save", "", "--quiet", *opts, cwd=cwd, MNIST_DATA_DIR=str(data_dir), **ENV)
    assert result.returncode == 0, result.stderr
    return request.param, opts, cwd / "run"


def test_sigkill_inside_an_epoch_then_resume_is_bit_exact(option_set, tmp_path, data_dir):
    name, opts, reference_dir = option_set
    run_dir = tmp_path / "run"
    killed, (epoch, step, total) = _signal_inside_epoch(run_dir, opts, tmp_path, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    state = torch.load(run_dir / "last.pth", weights_only=True)
    assert state["epoch"] == 1 and state.get("partial") is None  # epoch 1 saved, epoch 2 lost mid-way
    assert not (run_dir / "model.pth").exists()
    assert not list(run_dir.glob(".*.tmp")), "a killed write must not leave temporary files behind"

    # No option flag: the run's own options come from last.pth.
    resumed = run_cli("train", "--resume", run_dir, "--no-plots", "--save", "", cwd=tmp_path, MNIST_DATA_DIR=str(data_dir), **ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and "after epoch 1/3" in resumed.stdout
    _assert_same_run(run_dir, reference_dir)


def test_ctrl_c_saves_the_step_says_how_to_resume_and_resume_is_bit_exact(option_set, tmp_path, data_dir):
    name, opts, reference_dir = option_set
    run_dir = tmp_path / "run"
    stopped, (epoch, step, total) = _signal_inside_epoch(run_dir, opts, tmp_path, signal.SIGINT)
    assert stopped.returncode == 130, stopped.stdout
    lines = [line for line in stopped.stdout.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and f"resume with: mnistrec train --resume {run_dir}" in lines[0], stopped.stdout
    assert "Traceback" not in stopped.stdout
    # Ctrl-C saved where it stopped: inside epoch 2, at or after the step the bar showed.
    state = torch.load(run_dir / "last.pth", weights_only=True)
    assert state["epoch"] == 1 and state["partial"] is not None
    assert step <= int(state["partial"]["step"]) < total
    assert f"epoch 2, step {int(state['partial']['step'])}/{total}" in lines[0]

    resumed = run_cli("train", "--resume", run_dir, "--no-plots", "--save", "", cwd=tmp_path, MNIST_DATA_DIR=str(data_dir), **ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert f"step {int(state['partial']['step'])}/{total} of epoch 2" in resumed.stdout
    _assert_same_run(run_dir, reference_dir)


def test_resume_refuses_changed_options_in_one_line(tmp_path, data_dir, mnist, capsys):
    from mnistrec.cli import main
    from mnistrec.train import make_config, train

    run_dir = tmp_path / "run"
    train(make_config("seed", epochs=1, limit_train=300, limit_test=50), mnist, run_dir, progress=False, log=lambda _: None)
    before = (run_dir / "last.pth").read_bytes()
    changed = run_cli("train", "--resume", run_dir, "--lr", "0.5", "--no-plots", "--save", "", cwd=tmp_path, MNIST_DATA_DIR=str(data_dir), **ENV)
    assert changed.returncode == 2
    assert changed.stderr.strip().count("\n") == 0 and "lr=0.001 (now 0.5)" in changed.stderr
    assert main(["train", "--resume", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and err.count("\n") == 1
    assert (run_dir / "last.pth").read_bytes() == before
