"""Load benchmark of ``mnistrec serve``: 16 concurrent clients for 30 s against 127.0.0.1 only.

Starts a real server in a subprocess and, from concurrent keep-alive clients,
for a bounded time and count, sends single predictions in two phases:

- ``png``: a real MNIST test digit as the web page sends a drawing (140x140
  PNG, dark ink on white): decoding + the shared preprocessing + the model;
- ``pixels``: the same digit as a 28x28 JSON array (no preprocessing): the
  server, the micro-batcher and the model alone.

It reports p50/p95/p99 latency, requests per second, errors, the batching
achieved and the server's resident memory before and after each phase. The
reference measured in the same run is the same work in-process with no HTTP,
one image at a time: ``ratio_p50`` says what HTTP, queueing and batching add.

Before the load phases, ``sequential`` sends single-image requests one after
another on one keep-alive connection, PNG and pixels alternating (so both see
the same machine load): ``png_over_pixels_p50`` is what a canvas PNG costs
relative to 28x28 pixels (issue 15's bar: <= 1.5).

    python benchmarks/bench_serve_load.py [--checkpoint mnist_model.pth] [--clients 16] [--seconds 30] [--workers 1]

Without a checkpoint it trains the seed model for one epoch on 6,000 images
first: latency depends on the architecture, not on how well it is trained.
Writes ``benchmarks/results/serve_load.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from mnistrec.data import load_split  # noqa: E402
from serving import cpu_seconds, machine, quick_checkpoint, rss_mb, running_server, server_backend, user_png  # noqa: E402


def model_name(checkpoint: Path) -> str:
    """The registered model name the checkpoint holds (what the numbers depend on)."""
    from mnistrec.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint).model_name


def reference_ms(checkpoint: Path, bodies: list, kind: str, repeats: int) -> list[float]:
    """The same work without HTTP, one image at a time in this process: (decode + preprocess +) forward, with the
    backend the server picks by default (--backend auto: onnxruntime for a CNN)."""
    from mnistrec.backends import backend_for
    from mnistrec.checkpoint import load_checkpoint
    from mnistrec.predict import predict_tensors
    from mnistrec.preprocess import open_image, preprocess

    model = backend_for(load_checkpoint(checkpoint), "auto")
    times = []
    for i in range(repeats):
        body = bodies[i % len(bodies)]
        start = time.perf_counter()
        with torch.inference_mode():
            if kind == "png":
                x = preprocess(open_image(body)).unsqueeze(0)
            else:
                x = torch.tensor(json.loads(body)["pixels"]).reshape(1, 1, 28, 28)
            predict_tensors(model, x)
        times.append((time.perf_counter() - start) * 1000)
    return times[repeats // 10:]  # without the warm-up


CONTENT_TYPES = {"png": "image/png", "pixels": "application/json"}


class Connection:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: one POST at a time, ~0.1 ms of CPU per request.

    The load generator shares the 2 cores with the server; httpx's AsyncClient spent 1.4-2.7 ms of CPU per
    request (measured), CPU the server then lacked. Remote clients cost the server nothing, so the load
    phases use this lean client; the ``sequential`` phase keeps httpx (a typical Python client).
    """

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: {content_type}\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), None)
        if length is None:
            raise ConnectionError("response without Content-Length")
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


async def load(url: str, bodies: list[bytes], kind: str, clients: int, seconds: float, max_requests: int,
               server_pid: int) -> dict:
    latencies: list[float] = []
    rss: list[float] = []
    errors: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    sent = 0

    async def client(k: int) -> None:
        nonlocal sent
        connection = Connection(url)
        i = k
        try:
            while time.monotonic() < deadline and sent < max_requests:
                sent += 1
                start = time.perf_counter()
                try:
                    status, body = await asyncio.wait_for(
                        connection.post("/api/predict", bodies[i % len(bodies)], CONTENT_TYPES[kind]), 10)
                    key = None if status == 200 and b'"digit"' in body else f"HTTP {status}"
                except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
                    key = type(exc).__name__
                    await connection.close()
                    connection = Connection(url)
                if key:
                    errors[key] = errors.get(key, 0) + 1
                else:
                    latencies.append((time.perf_counter() - start) * 1000)
                i += clients
        finally:
            await connection.close()

    async def sample_memory() -> None:  # the server's RSS every second, to see whether it keeps growing
        while time.monotonic() < deadline:
            rss.append(round(rss_mb(server_pid), 1))
            await asyncio.sleep(1.0)

    started = time.monotonic()
    cpu_before = time.process_time()
    await asyncio.gather(sample_memory(), *(client(k) for k in range(clients)))
    elapsed = time.monotonic() - started
    return {"latencies": latencies, "errors": errors, "seconds": elapsed, "sent": sent, "rss": rss,
            "client_cpu_seconds": time.process_time() - cpu_before}


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    q = np.percentile(values, [50, 95, 99])
    return {"p50_ms": round(float(q[0]), 2), "p95_ms": round(float(q[1]), 2), "p99_ms": round(float(q[2]), 2),
            "mean_ms": round(statistics.fmean(values), 2), "max_ms": round(max(values), 2)}


def sequential(url: str, bodies: dict, repeats: int) -> dict:
    """Single-image requests one at a time on one connection, PNG and pixels alternating: latency of each, and ratio."""
    times: dict[str, list[float]] = {"png": [], "pixels": []}
    with httpx.Client(base_url=url, timeout=30) as http:
        for i in range(repeats + 10):
            for kind in ("png", "pixels"):
                start = time.perf_counter()
                response = http.post("/api/predict", content=bodies[kind][i % len(bodies[kind])],
                                     headers={"content-type": CONTENT_TYPES[kind]})
                response.raise_for_status()
                if i >= 10:  # the first ten pairs warm up
                    times[kind].append((time.perf_counter() - start) * 1000)
    png, pixels = percentiles(times["png"]), percentiles(times["pixels"])
    return {"what": "one client, one keep-alive connection, one image per request, PNG and pixels alternating",
            "requests_each": repeats, "png": png, "pixels": pixels,
            "png_over_pixels_p50": round(png["p50_ms"] / pixels["p50_ms"], 2),
            "target_png_at_most_1.5x_pixels": png["p50_ms"] / pixels["p50_ms"] <= 1.5}


REQUESTS = {"png": "POST /api/predict, image/png body: a 140x140 dark-on-white MNIST test digit, an 8-bit grey PNG built "
                   "as the page builds its drawing (serving.page_png)",
            "pixels": "POST /api/predict, JSON {\"pixels\": 28x28 floats}: no preprocessing"}


def phase_report(kind: str, result: dict, health_before: dict, health_after: dict, rss_before: float,
                 rss_after: float, reference: list[float]) -> dict:
    served = health_after["requests"] - health_before["requests"]
    passes = health_after["forward_passes"] - health_before["forward_passes"]
    ok = len(result["latencies"])
    stats, ref = percentiles(result["latencies"]), percentiles(reference)
    return {
        "request": REQUESTS[kind],
        "requests": {"sent": result["sent"], "ok": ok, "errors": sum(result["errors"].values()),
                     "error_kinds": result["errors"], "per_second": round(ok / result["seconds"], 1),
                     "seconds": round(result["seconds"], 2)},
        "latency": stats,
        "server_cpu_ms_per_request": round(1000 * result["server_cpu_seconds"] / ok, 2) if ok else None,
        "client_cpu_ms_per_request": round(1000 * result["client_cpu_seconds"] / ok, 2) if ok else None,
        "batching": {"requests": served, "forward_passes": passes, "mean_batch": round(served / passes, 2) if passes else None},
        "memory_mb": {"rss_before": round(rss_before, 1), "rss_after": round(rss_after, 1),
                      "growth": round(rss_after - rss_before, 1),
                      # after the first third (thread pools and allocator arenas warmed up) it should stay flat
                      "growth_last_two_thirds": round(rss_after - result["rss"][len(result["rss"]) // 3], 1)
                      if result["rss"] else None,
                      "every_second": result["rss"]},
        "reference_in_process": {"what": "the same work in this process, one image at a time, no HTTP", **ref},
        "ratio_p50": round(stats["p50_ms"] / ref["p50_ms"], 2) if stats and ref else None,
        "targets": {"p99_under_50ms": bool(stats) and stats["p99_ms"] < 50, "zero_errors": not result["errors"],
                    "flat_memory_under_5pct_after_warmup": bool(result["rss"])
                    and rss_after - result["rss"][len(result["rss"]) // 3] < 0.05 * rss_before},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="checkpoint to serve (default: mnist_model.pth if present, else a 1-epoch seed model)")
    parser.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR"))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-requests", type=int, default=200_000, help="stop after this many requests, whatever the time")
    parser.add_argument("--requests", default="png,pixels", help="phases to run, comma-separated: png, pixels")
    parser.add_argument("--sequential", type=int, default=300, help="single requests of each kind, one at a time (0: skip)")
    parser.add_argument("--workers", type=int, default=1, help="server processes (mnistrec serve --workers N; default 1)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve_load.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint or REPO / "mnist_model.pth")
        note = None
        if not checkpoint.is_file():
            if args.checkpoint:
                sys.exit(f"bench_serve_load: {checkpoint}: no such checkpoint")
            print("no mnist_model.pth: training the seed model for one epoch …", file=sys.stderr)
            checkpoint = quick_checkpoint(Path(tmp) / "run", args.data_dir)
            note = "seed MLP trained by the benchmark, 1 epoch on 6,000 images (latency depends on the architecture only)"

        images, _ = load_split("test", args.data_dir)
        bodies = {"png": [user_png(images[i].numpy()) for i in range(64)],
                  "pixels": [json.dumps({"pixels": (images[i].float() / 255).tolist()}).encode() for i in range(64)]}
        info = machine()
        kinds = [k for k in args.requests.split(",") if k]
        references = {kind: reference_ms(checkpoint, bodies[kind], kind, 300) for kind in kinds}

        phases, one_at_a_time = {}, None
        with running_server(checkpoint, Path(tmp) / "serve.log", args=["--workers", str(args.workers)]) as (url, server):
            if args.sequential:
                one_at_a_time = sequential(url, bodies, args.sequential)
            for kind in kinds:
                for body in bodies[kind]:  # warm-up: first-call costs are not part of steady state
                    httpx.post(url + "/api/predict", content=body, headers={"content-type": CONTENT_TYPES[kind]}, timeout=30)
                health_before = httpx.get(url + "/api/health").json()
                rss_before, cpu_before = rss_mb(server.pid), cpu_seconds(server.pid)
                result = asyncio.run(load(url, bodies[kind], kind, args.clients, args.seconds, args.max_requests,
                                          server.pid))
                rss_after, cpu_after = rss_mb(server.pid), cpu_seconds(server.pid)
                result["server_cpu_seconds"] = cpu_after - cpu_before
                health_after = httpx.get(url + "/api/health").json()
                phases[kind] = phase_report(kind, result, health_before, health_after, rss_before, rss_after,
                                            references[kind])
                if args.workers > 1:  # /api/health counts one worker's requests: whichever answered
                    phases[kind]["batching"] = {"note": "not measured: each worker process counts its own"}

    report = {
        "benchmark": "serve_load",
        "command": "python benchmarks/bench_serve_load.py " + " ".join(sys.argv[1:]),
        "machine": {**info, "load_average_1m_after": os.getloadavg()[0],
                    "note": "shared machine: 2 cores used by several engineers at once (see load_average_1m); "
                            "the load generator runs on the same cores as the server "
                            "(a lean asyncio HTTP/1.1 client: see client_cpu_ms_per_request)"},
        "setup": {"clients": args.clients, "seconds_per_phase": args.seconds, "max_requests_per_phase": args.max_requests,
                  "server": f"mnistrec serve --workers {args.workers} (uvicorn), 127.0.0.1",
                  "load_client": "16 keep-alive connections, one request at a time each (bench_serve_load.Connection)",
                  "checkpoint": str(checkpoint), "model": model_name(checkpoint), "checkpoint_note": note,
                  "backend": server_backend(checkpoint)},
        "sequential": one_at_a_time,
        "phases": phases,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"sequential": one_at_a_time, "phases": phases}, indent=2))
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
