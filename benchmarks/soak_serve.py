"""Soak test of ``mnistrec serve``: minutes of load on 127.0.0.1 with bad requests mixed in.

Starts a real server in a subprocess; several keep-alive clients send, for a bounded
time and count, a mix of valid predictions (real MNIST test digits as PNG drawings
and as 28x28 JSON pixels, each checked against the digit the in-process model
predicts) and bad requests (garbage bytes, truncated PNGs, a decompression-bomb
header, empty bodies, malformed JSON, wrong shapes, bad query values, unknown
routes). The server's resident memory is sampled every second.

Pass/fail, written to the JSON and the exit code:
  - every valid request gets 200 and the expected digit;
  - every bad request gets a 4xx (never a 5xx, never a dropped connection);
  - RSS growth after warm-up (max over the second half minus the median of the first
    tenth) stays under ``--rss-bound-mb`` (default 64 MiB).
The reference in the same run is the first tenth of the soak: ``p50_ratio_last_vs_first``
says whether latency degraded over time.

    python benchmarks/soak_serve.py [--seconds 300] [--clients 4] [--checkpoint mnist_model.pth]

Writes ``benchmarks/results/soak.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from serving import machine, quick_checkpoint, rss_mb, running_server, user_png  # noqa: E402


def bad_requests(png: bytes) -> list[tuple[str, str, dict, bytes | None, dict | None]]:
    """(name, path, headers, raw body, json body): each must get a 4xx."""
    bomb = io.BytesIO()
    Image.new("L", (1, 1)).save(bomb, "PNG")
    # Rewrite the IHDR size to 100,000 x 100,000 (the CRC is then wrong too: either way a 4xx).
    header = bytearray(bomb.getvalue())
    header[16:24] = (100_000).to_bytes(4, "big") * 2
    rng = random.Random(0)
    return [
        ("garbage bytes", "/api/predict", {"content-type": "image/png"}, rng.randbytes(2000), None),
        ("truncated png", "/api/predict", {"content-type": "image/png"}, png[: len(png) // 2], None),
        ("bomb header", "/api/predict", {"content-type": "image/png"}, bytes(header), None),
        ("empty body", "/api/predict", {"content-type": "image/png"}, b"", None),
        ("malformed json", "/api/predict", {"content-type": "application/json"}, b'{"pixels": [1, 2', None),
        ("wrong shape", "/api/predict", {}, None, {"pixels": [[0.5] * 27] * 28}),
        ("pixels out of range", "/api/predict", {}, None, {"pixels": [[5.0] * 28] * 28}),
        ("bad top_k", "/api/predict?top_k=0", {"content-type": "image/png"}, png, None),
        ("unsupported type", "/api/predict", {"content-type": "text/plain"}, b"seven", None),
        ("unknown route", "/api/nope", {"content-type": "image/png"}, png, None),
        ("v2 wrong datatype", "/v2/models/mnistrec/infer", {}, None,
         {"inputs": [{"name": "x", "shape": [1, 784], "datatype": "BYTES", "data": ["a"] * 784}]}),
    ]


class Soak:
    def __init__(self, url: str, valid: list[tuple[str, dict, bytes | None, dict | None, int]], bad: list,
                 bad_fraction: float, seconds: float, max_requests: int) -> None:
        self.url, self.valid, self.bad, self.bad_fraction = url, valid, bad, bad_fraction
        self.deadline = time.monotonic() + seconds
        self.start = time.monotonic()
        self.max_requests = max_requests
        self.lock = threading.Lock()
        self.sent = 0
        self.valid_ok = 0
        self.valid_failures: list[str] = []
        self.bad_4xx = 0
        self.bad_wrong: list[str] = []
        self.bad_by_kind: dict[str, int] = {}
        self.latencies: list[tuple[float, float]] = []  # (seconds since start, ms) of valid requests

    def _take(self) -> bool:
        with self.lock:
            if time.monotonic() >= self.deadline or self.sent >= self.max_requests:
                return False
            self.sent += 1
            return True

    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while self._take():
                is_bad = rng.random() < self.bad_fraction
                if is_bad:
                    name, path, headers, raw, body = rng.choice(self.bad)
                else:
                    name, headers, raw, body, expected = rng.choice(self.valid)
                    path = "/api/predict"
                began = time.perf_counter()
                try:
                    response = http.post(path, headers=headers, content=raw, json=body) if body is not None or raw is not None \
                        else http.post(path, headers=headers)
                    status, text = response.status_code, response.text
                except httpx.HTTPError as exc:
                    status, text = 0, f"{type(exc).__name__}: {exc}"
                elapsed_ms = (time.perf_counter() - began) * 1000
                with self.lock:
                    if is_bad:
                        self.bad_by_kind[name] = self.bad_by_kind.get(name, 0) + 1
                        if 400 <= status < 500:
                            self.bad_4xx += 1
                        else:
                            self.bad_wrong.append(f"{name}: {status} {text[:120]}")
                    else:
                        ok = status == 200 and json.loads(text).get("digit") == expected
                        if ok:
                            self.valid_ok += 1
                            self.latencies.append((time.monotonic() - self.start, elapsed_ms))
                        else:
                            self.valid_failures.append(f"{name}: {status} {text[:120]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="checkpoint to serve (default: a quick 1-epoch seed model)")
    parser.add_argument("--data-dir", help="MNIST folder (default: $MNIST_DATA_DIR)")
    parser.add_argument("--seconds", type=float, default=300.0, help="soak duration (default: 300)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent keep-alive clients (default: 4)")
    parser.add_argument("--bad-fraction", type=float, default=0.2, help="share of bad requests (default: 0.2)")
    parser.add_argument("--max-requests", type=int, default=200_000, help="hard cap on requests (default: 200000)")
    parser.add_argument("--rss-bound-mb", type=float, default=64.0, help="allowed RSS growth after warm-up, MiB (default: 64)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "soak.json"))
    args = parser.parse_args()

    from mnistrec.checkpoint import load_checkpoint
    from mnistrec.data import load_split
    from mnistrec.predict import predict_tensors
    from mnistrec.preprocess import open_image, preprocess

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else quick_checkpoint(Path(tmp) / "run", args.data_dir)
        model = load_checkpoint(checkpoint).model
        images, _ = load_split("test", args.data_dir)
        valid = []
        for i in range(20):  # expected digits from the same functions, in this process
            digit = images[i].numpy()
            png = user_png(digit)
            valid.append((f"png #{i}", {"content-type": "image/png"}, png, None,
                          predict_tensors(model, preprocess(open_image(png)).unsqueeze(0))[0]["digit"]))
            pixels = (images[i].float() / 255).tolist()
            valid.append((f"pixels #{i}", {}, None, {"pixels": pixels},
                          predict_tensors(model, torch.tensor(pixels).reshape(1, 1, 28, 28))[0]["digit"]))
        bad = bad_requests(valid[0][2])

        with running_server(checkpoint, Path(tmp) / "serve.log") as (url, server):
            soak = Soak(url, valid, bad, args.bad_fraction, args.seconds, args.max_requests)
            samples: list[tuple[float, float]] = []
            threads = [threading.Thread(target=soak.client, args=(k,)) for k in range(args.clients)]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                samples.append((round(time.monotonic() - soak.start, 2), round(rss_mb(server.pid), 1)))
                time.sleep(1.0)
            for t in threads:
                t.join()
            elapsed = time.monotonic() - soak.start
            alive = server.poll() is None

    tenth = max(1, len(samples) // 10)
    baseline = statistics.median(rss for _, rss in samples[:tenth])
    late_max = max(rss for _, rss in samples[len(samples) // 2 :])
    growth = late_max - baseline
    first = [ms for t, ms in soak.latencies if t <= elapsed / 10]
    last = [ms for t, ms in soak.latencies if t >= elapsed * 0.9]
    p50_first = float(np.median(first)) if first else None
    p50_last = float(np.median(last)) if last else None
    passed = (alive and not soak.valid_failures and not soak.bad_wrong and growth <= args.rss_bound_mb and soak.valid_ok > 0)
    result = {
        "benchmark": "soak_serve",
        "command": "python benchmarks/soak_serve.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "note": "2-core machine shared with other jobs while measured; latency figures are indicative only",
        "seconds": round(elapsed, 1),
        "clients": args.clients,
        "requests": soak.sent,
        "requests_per_second": round(soak.sent / elapsed, 1),
        "valid": {"ok": soak.valid_ok, "failed": len(soak.valid_failures), "failures": soak.valid_failures[:10]},
        "bad": {"sent": sum(soak.bad_by_kind.values()), "got_4xx": soak.bad_4xx, "not_4xx": len(soak.bad_wrong),
                "wrong": soak.bad_wrong[:10], "by_kind": soak.bad_by_kind},
        "rss_mb": {"baseline_first_tenth_median": baseline, "max_second_half": late_max, "growth": round(growth, 1),
                   "bound": args.rss_bound_mb, "max": max(r for _, r in samples), "samples": samples[:: max(1, len(samples) // 60)]},
        "latency_ms_p50": {"first_tenth": p50_first, "last_tenth": p50_last,
                           "ratio_last_vs_first": round(p50_last / p50_first, 3) if p50_first and p50_last else None},
        "server_alive_at_end": alive,
        "passed": passed,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"soak: {soak.sent} requests in {elapsed:.0f}s ({result['requests_per_second']}/s); valid ok {soak.valid_ok}, "
          f"failed {len(soak.valid_failures)}; bad {result['bad']['sent']} -> 4xx {soak.bad_4xx}, other {len(soak.bad_wrong)}; "
          f"RSS {baseline:.0f} -> max {late_max:.0f} MiB (growth {growth:.1f}, bound {args.rss_bound_mb}); "
          f"p50 {p50_first and round(p50_first, 1)} -> {p50_last and round(p50_last, 1)} ms; {'PASS' if passed else 'FAIL'}")
    print(f"wrote {args.out}")
    return 0 if passed else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as exc:  # the server did not start
        sys.exit(f"soak_serve: {exc}")
