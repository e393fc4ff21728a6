"""`mnistrec download` against a real HTTP server on 127.0.0.1 that serves the shared MNIST files.

The server has one URL prefix per behaviour: ``/good/`` serves the real files,
``/missing/`` answers 404, ``/short/`` promises the full Content-Length and closes
after half the body, ``/wrong/`` serves a valid gzip of a valid but different
IDX file, ``/html/`` an error page with status 200, ``/stall/`` sends half the
body and then waits, ``/bomb/`` a valid 2 MB gzip that unpacks to 2 GiB of zeros.
"""

from __future__ import annotations

import functools
import gzip
import io
import shutil
import signal
import struct
import subprocess
import sys
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import REPO, cli_env, run_cli, run_cli_peak_rss
from mnistrec.data import FILES, download, load_split
from mnistrec.errors import DataError

NAMES = [f"{name}.gz" for name in FILES]
BOMB_MIB = 2048


@functools.lru_cache(maxsize=1)
def gzip_bomb(mib: int = BOMB_MIB) -> bytes:
    """A valid gzip file (header, deflate stream, CRC-32, length) of ``mib`` MiB of zeros, about 1 KB per MiB.

    Built from one deflate block repeated: after a full flush the compressor forgets its history,
    so compressing the same MiB again yields the same bytes.
    """
    zeros = bytes(1 << 20)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH) == block
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    trailer = struct.pack("<II", crc, (mib << 20) & 0xFFFFFFFF)
    return header + first + block * (mib - 1) + compressor.flush(zlib.Z_FINISH) + trailer


class MirrorServer:
    """A loopback HTTP server with one failure mode per URL prefix; it records every request."""

    def __init__(self, data_dir: Path) -> None:
        self.files = {name: (data_dir / name).read_bytes() for name in NAMES}
        self.requests: list[str] = []
        self.release = threading.Event()  # lets /stall/ handlers finish at teardown
        self.stalled = threading.Event()  # set once a /stall/ handler has sent its first bytes
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                server.requests.append(self.path)
                _, mode, name = self.path.split("/", 2)
                if name not in server.files or mode == "missing":
                    self.send_error(404, "Not Found")
                    return
                body = server.files[name]
                if mode == "wrong":
                    # Valid gzip and valid IDX of the right kind, but not MNIST's bytes.
                    idx = (struct.pack(">IIII", 0x803, 2, 28, 28) + bytes(2 * 784) if "images" in name
                           else struct.pack(">II", 0x801, 3) + bytes([1, 2, 3]))
                    body = gzip.compress(idx)
                elif mode == "html":
                    body = b"<html><body>Service temporarily unavailable</body></html>"
                elif mode == "bomb":
                    body = gzip_bomb()
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if mode in ("short", "stall"):
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    if mode == "stall":
                        server.stalled.set()
                        server.release.wait(120)  # until teardown; a loaded machine may be slow to interrupt
                    self.close_connection = True  # the body ends early: the client sees EOF
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, mode: str) -> str:
        return f"{self.base}/{mode}/"

    def __enter__(self) -> "MirrorServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture()
def server(data_dir):
    with MirrorServer(data_dir) as srv:
        yield srv


def _assert_only_final_files(directory: Path, expected: set[str]) -> None:
    # No temporary ".part" files, no half-written files under a real name.
    assert {p.name for p in directory.iterdir()} == expected


def test_download_falls_through_failing_mirrors_to_a_good_one_with_reasons(server, data_dir, tmp_path):
    target = tmp_path / "mnist"
    closed_port = "http://127.0.0.1:9/"  # the discard port: nothing listens there
    mirrors = [closed_port, server.url("missing"), server.url("short"), server.url("wrong"), server.url("html"), server.url("good")]
    args = ["download", "--data-dir", target]
    for mirror in mirrors:
        args += ["--mirror", mirror]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    err = result.stderr
    # Every file tried every failing mirror, in order, and says why each one failed.
    for name in NAMES:
        failures = [line for line in err.splitlines() if line.startswith(f"{name}: ") and "failed" in line]
        assert len(failures) == 5, err
        assert "Connection refused" in failures[0] and failures[0].count(closed_port) == 1
        assert "HTTP 404 Not Found" in failures[1]
        assert "connection closed after" in failures[2]
        assert "checksum mismatch" in failures[3]
        assert "not a valid gzip file" in failures[4]
        assert f"{name}: downloaded from {server.url('good')}" in err
    modes = [path.split("/")[1] for path in server.requests if path.endswith(NAMES[0])]
    assert modes == ["missing", "short", "wrong", "html", "good"]
    assert f"MNIST is ready in {target}" in result.stdout
    _assert_only_final_files(target, set(NAMES))
    for name in NAMES:
        assert (target / name).read_bytes() == (data_dir / name).read_bytes()
    images, labels = load_split("test", target, cache_dir="")
    assert images.shape == (10000, 28, 28) and labels[:3].tolist() == [7, 2, 1]


def test_all_mirrors_failing_is_one_error_line_and_leaves_nothing(server, tmp_path):
    target = tmp_path / "mnist"
    result = run_cli("download", "--data-dir", target, "--mirror", server.url("missing"),
                     "--mirror", server.url("short"), "--mirror", server.url("wrong"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("mnistrec: error: ")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0]
    assert "could not download train-images-idx3-ubyte.gz from any mirror" in errors[0]
    for reason in ("HTTP 404 Not Found", "connection closed after", "checksum mismatch"):
        assert reason in errors[0]
    _assert_only_final_files(target, set())


def _fill(target: Path, data_dir: Path) -> None:
    target.mkdir()
    for name in NAMES:
        shutil.copyfile(data_dir / name, target / name)


def test_existing_good_files_are_kept_without_any_request(server, data_dir, tmp_path):
    target = tmp_path / "mnist"
    _fill(target, data_dir)
    before = {name: (target / name).stat() for name in NAMES}
    log: list[str] = []
    download(target, [server.url("missing")], progress=False, log=log.append)
    assert server.requests == []
    assert log == [f"{name}: present and verified" for name in NAMES]
    for name in NAMES:
        after = (target / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before[name].st_ino, before[name].st_mtime_ns)


def test_a_corrupt_existing_file_is_downloaded_again(server, data_dir, tmp_path):
    target = tmp_path / "mnist"
    _fill(target, data_dir)
    bad = target / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:1000])  # truncated gzip
    log: list[str] = []
    download(target, [server.url("good")], progress=False, log=log.append)
    assert server.requests == ["/good/t10k-labels-idx1-ubyte.gz"]
    assert any("not a valid gzip file" in line and "downloading again" in line for line in log)
    assert bad.read_bytes() == (data_dir / bad.name).read_bytes()
    _assert_only_final_files(target, set(NAMES))


def test_a_stalled_mirror_times_out_and_a_corrupt_file_survives_total_failure(server, data_dir, tmp_path):
    target = tmp_path / "mnist"
    _fill(target, data_dir)
    bad = target / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(b"junk")
    log: list[str] = []
    with pytest.raises(DataError) as info:
        download(target, [server.url("stall"), server.url("missing")], timeout=0.5, progress=False, log=log.append)
    assert "could not download t10k-images-idx3-ubyte.gz" in str(info.value)
    assert "timed out" in str(info.value) and "HTTP 404" in str(info.value)
    # Nothing half-written: the old file is untouched and no temporary file is left.
    assert bad.read_bytes() == b"junk"
    _assert_only_final_files(target, set(NAMES))


def test_interrupted_download_leaves_no_file(server, tmp_path):
    target = tmp_path / "mnist"
    process = subprocess.Popen(
        [sys.executable, "-m", "mnistrec", "download", "--data-dir", str(target), "--mirror", server.url("stall"),
         "--timeout", "300"],
        cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A shell that starts jobs in the background (nohup, CI runners) makes them ignore SIGINT, and Python
        # then keeps ignoring it; give the child the default disposition, as a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert server.stalled.wait(240), "the downloader never reached the server"
        # The temporary file is created before the request is sent, so it exists once the server
        # has been reached: no sleep needed; the signal then lands in the middle of the transfer.
        assert any(p.name.endswith(".part.gz") for p in target.iterdir())
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert "Traceback" not in err
    _assert_only_final_files(target, set())


def test_a_gzip_bomb_is_refused_with_bounded_memory_and_the_next_mirror_is_used(server, data_dir, tmp_path):
    """The real attack: a hostile mirror serves a 2 MB gzip that unpacks to 2 GiB. The download unpacks at most
    the expected size + 1 byte while hashing, refuses it, and takes the next mirror; the child's peak RSS
    (its own VmHWM, see conftest.run_cli_peak_rss) stays far below the 2 GiB the bomb would need."""
    bomb = gzip_bomb()
    assert len(bomb) < 3_000_000
    with gzip.open(io.BytesIO(bomb)) as fh:  # it really is a valid gzip of zeros
        assert fh.read(1 << 20) == bytes(1 << 20)
    target = tmp_path / "mnist"
    code, _, stderr, peak_kib = run_cli_peak_rss("download", "--data-dir", target, "--mirror", server.url("bomb"),
                                                 "--mirror", server.url("good"), tmp_path=tmp_path)
    assert code == 0, stderr
    for name in NAMES:
        refused = [line for line in stderr.splitlines() if line.startswith(f"{name}: ") and "/bomb/" in line]
        assert len(refused) == 1 and "failed" in refused[0], stderr
        size = FILES[name[:-3]].size
        if size > len(bomb):  # the images: the 2 MB body is plausible, its unpacking is capped
            assert f"unpacks to more than the expected {size:,} bytes" in refused[0], stderr
        else:  # the labels: a body bigger than the unpacked file plus 1 MiB is not even read to the end
            assert f"the mirror sent more than {size + (1 << 20):,} bytes" in refused[0], stderr
        assert f"{name}: downloaded from {server.url('good')}" in stderr
    assert [p.split("/")[1] for p in server.requests if p.endswith(NAMES[0])] == ["bomb", "good"]
    _assert_only_final_files(target, set(NAMES))
    peak_mb = peak_kib / 1024
    print(f"gzip bomb ({len(bomb):,} bytes -> {BOMB_MIB} MiB): refused; download peak RSS {peak_mb:.0f} MB")
    assert peak_mb < 1024, f"peak RSS {peak_mb:.0f} MB"


def test_a_gzip_bomb_already_in_the_data_directory_is_read_with_bounded_memory(server, data_dir, tmp_path):
    """The same 2 GiB bomb saved under an MNIST name in the data directory (where `download`, `train` and `evaluate`
    read it): at most the file's known size + 1 byte is unpacked (2 GiB would be before), it is named as damaged
    and downloaded again."""
    target = tmp_path / "mnist"
    _fill(target, data_dir)
    (target / "train-images-idx3-ubyte.gz").write_bytes(gzip_bomb())
    code, stdout, stderr, peak_kib = run_cli_peak_rss("download", "--data-dir", target, "--mirror", server.url("good"),
                                                      tmp_path=tmp_path)
    log = stdout + stderr
    assert code == 0, log
    assert "train-images-idx3-ubyte.gz: bad magic number 0x00000000" in log and "downloading again" in log, log
    assert server.requests == ["/good/train-images-idx3-ubyte.gz"]
    assert (target / "train-images-idx3-ubyte.gz").read_bytes() == (data_dir / "train-images-idx3-ubyte.gz").read_bytes()
    assert peak_kib / 1024 < 1024, f"peak RSS {peak_kib / 1024:.0f} MB"
