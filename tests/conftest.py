"""Shared fixtures: the real MNIST files, small real checkpoints, and a CLI runner.

Tests read MNIST from ``../shared/datasets/mnist`` (or ``$MNIST_DATA_DIR``). They
never download from the internet and never train for minutes: a few thousand
images are enough to prove that the code learns.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
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


# A child's own peak RSS is not what os.wait4() reports: Linux carries the parent's peak across fork/vfork + exec
# into the child's ru_maxrss, so a child of a pytest process grown past 1 GB "peaks" past 1 GB whatever it does.
# VmHWM in /proc/self/status belongs to the address space exec creates, so the child reads it itself at exit.
PEAK_RSS_WRAPPER = """
import runpy, sys
peak_file = sys.argv.pop(1)
sys.argv[0] = "mnistrec"
try:
    runpy.run_module("mnistrec", run_name="__main__", alter_sys=True)
finally:
    with open("/proc/self/status") as status, open(peak_file, "w") as out:
        out.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
"""


def run_cli_peak_rss(*args: str, tmp_path: Path, timeout: float = 600, **env: str) -> tuple[int, str, str, int]:
    """``python -m mnistrec ARGS`` in a subprocess: (exit code, stdout, stderr, that process's own peak RSS in KiB)."""
    peak = tmp_path / "peak_rss_kib"
    done = subprocess.run([sys.executable, "-c", PEAK_RSS_WRAPPER, str(peak), *map(str, args)], cwd=REPO,
                          env=cli_env(**env), capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout)
    return done.returncode, done.stdout, done.stderr, int(peak.read_text())


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Run ``python -m mnistrec ARGS`` in a real subprocess and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "mnistrec", *map(str, args)],
        cwd=cwd or REPO, env=cli_env(**env), capture_output=True, text=True, timeout=timeout,
    )


BAR = re.compile(rb"epoch (\d+)/\d+:\s*\d+%\|[^|\r\n]*\|\s*(\d+)/(\d+)")


def signal_inside_epoch(cmd: list[str], cwd: Path, env: dict[str, str], sig: int, epoch: int = 2,
                        window: tuple[float, float] = (0.05, 0.6), columns: int = 1000,
                        ) -> tuple[subprocess.CompletedProcess, tuple[int, int, int]]:
    """Run a training command with its tqdm bar on a pseudo-terminal; send ``sig`` once the bar shows ``epoch``
    within ``window`` (fractions of the epoch). Returns (the finished process, the (epoch, step, total) signalled at).

    No sleep guesses the timing, and the child cannot outrun the reader: the bar is redrawn at every step
    (``TQDM_MININTERVAL=0``, ``TQDM_MINITERS=1``) and is ``columns`` wide, so the pty's buffer (about 19 kB
    on Linux) holds only a few dozen redraws; past that the child's writes block until this reader reads.
    So when the signal is sent the child is at most a few dozen steps past the step the test saw, on a
    fast machine (an epoch quicker than tqdm's default 0.1 s refresh) as on a loaded one (a slow reader).
    """
    master, slave = pty.openpty()
    # A pty starts 0x0 and tqdm draws nothing into zero columns.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen(cmd, cwd=cwd, env=cli_env(**env, TQDM_MININTERVAL="0", TQDM_MINITERS="1"),
                            stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    seen, signalled, deadline = b"", None, time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if not select.select([master], [], [], 0.2)[0]:
                continue
            try:
                seen = (seen + os.read(master, 65536))[-4 * columns * 4:]
            except OSError:  # the child closed the terminal
                break
            bars = BAR.findall(seen)
            if bars and signalled is None:
                at, step, total = map(int, bars[-1])
                if at == epoch and window[0] * total <= step <= window[1] * total:
                    proc.send_signal(sig)
                    signalled = (at, step, total)
                    break
        # Keep draining the terminal so the child never blocks writing its last words.
        while proc.poll() is None and time.monotonic() < deadline + 60:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    os.read(master, 65536)
                except OSError:
                    pass
        stdout = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert signalled is not None, f"never saw epoch {epoch} in progress; last output: {seen[-300:]!r}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout.decode(), ""), signalled


@pytest.fixture(scope="session")
def mlp_checkpoint(tmp_path_factory, mnist) -> Path:
    """A real mnistrec checkpoint of the seed MLP, trained for one epoch on 6,000 images (about 90% accurate)."""
    from mnistrec.train import make_config, train

    run_dir = tmp_path_factory.mktemp("mlp-run")
    train(make_config("seed", epochs=1, limit_train=6000, limit_test=1000), mnist, run_dir, progress=False, log=lambda _: None)
    return run_dir / "model.pth"
