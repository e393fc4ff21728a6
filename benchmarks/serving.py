"""What the serving benchmarks share: a real ``mnistrec serve`` on loopback, a quick model, process probes.

Used by ``bench_serve_load.py``, ``soak_serve.py``, ``bench_page_latency.py`` and the
tests that start a real server (``tests/test_serve_browser.py``, ``tests/test_reliability_fuzz.py``).
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from machine import machine_info  # noqa: E402


def machine() -> dict:
    """The machine's details and its current load average."""
    return {**machine_info(), "load_average_1m": os.getloadavg()[0]}


def server_backend(checkpoint: Path) -> str:
    """What `mnistrec serve CHECKPOINT` runs the model with by default (--backend auto), e.g. "onnx" for a CNN."""
    from mnistrec.backends import resolve_backend
    from mnistrec.checkpoint import load_checkpoint

    name = load_checkpoint(checkpoint).model_name
    return f"{resolve_backend('auto', name)} ({name}, --backend auto)"


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (uvicorn's worker processes under ``--workers N``), from /proc (Linux)."""
    pids, index = [pid], 0
    while index < len(pids):
        for task in Path(f"/proc/{pids[index]}/task").glob("*/children"):
            try:
                pids += [int(child) for child in task.read_text().split()]
            except OSError:  # the task ended while we looked
                pass
        index += 1
    return pids


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants from /proc (Linux), in MiB."""
    total = 0
    for member in process_tree(pid):
        try:
            for line in open(f"/proc/{member}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process and its descendants have used, from /proc (Linux)."""
    total = 0
    for member in process_tree(pid):
        try:
            fields = open(f"/proc/{member}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def user_png(digit: np.ndarray) -> bytes:
    """An MNIST digit as the web page sends a drawing: dark ink on white, a 140x140 PNG built by :func:`page_png`."""
    return page_png(np.asarray(Image.fromarray(255 - digit).resize((140, 140), Image.BILINEAR)))


def page_png(grey: np.ndarray) -> bytes:
    """An 8-bit greyscale PNG built as the drawing page builds its own (``drawingPng`` in static/app.js): every row
    with filter type 0, one zlib stream (the browser's CompressionStream("deflate"), zlib's default level here).
    tests/test_serve_browser.py checks that the page's PNGs have this format."""
    height, width = grey.shape
    rows = np.zeros((height, width + 1), np.uint8)
    rows[:, 1:] = grey

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes()))
            + chunk(b"IEND", b""))


@contextmanager
def running_server(checkpoint: Path | None, log: Path, env: dict[str, str] | None = None,
                   start_timeout: float = 120, args: list[str] | tuple[str, ...] = ()) -> Iterator[tuple[str, subprocess.Popen]]:
    """``mnistrec serve CHECKPOINT [ARGS]`` on a free 127.0.0.1 port, healthy before it is yielded, stopped after.

    ``checkpoint=None`` serves the model shipped in the package.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = env or {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "mnistrec", "serve", *([str(checkpoint)] if checkpoint else []),
                                   "--port", str(port), *args],
                                  cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + start_timeout  # a loaded 2-core machine imports torch slowly
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"mnistrec serve exited with {server.returncode}: {log.read_text()[-2000:]}")
            try:
                if httpx.get(url + "/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mnistrec serve did not answer within {start_timeout:.0f} s")
            time.sleep(0.3)
        yield url, server
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def quick_checkpoint(out: Path, data_dir: str | None) -> Path:
    """A 1-epoch seed MLP on 6,000 images: serving cost depends on the architecture, not on training."""
    from mnistrec.data import load_mnist
    from mnistrec.train import make_config, train

    train(make_config("seed", epochs=1, limit_train=6000, limit_test=500), load_mnist(data_dir), out, progress=False, log=lambda _: None)
    return out / "model.pth"
