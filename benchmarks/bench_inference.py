"""Inference speed: images per second and single-image latency, PyTorch vs onnxruntime.

For every registered model (untrained weights: speed does not depend on the values)
and both backends of :mod:`mnistrec.backends`, measures

* throughput in images/s at batch sizes 1, 64 and 1024 (the best of several
  repeats, each at least ``--seconds`` long, after a warm-up), and
* single-image latency (median and 99th percentile of one ``predict_logits`` call
  on a ``[1, 1, 28, 28]`` tensor).

References measured in the same run: onnxruntime vs PyTorch at the same batch
size, and batched vs the naive per-image loop (batch 1) of the same backend.
Writes ``benchmarks/results/inference.json`` with the machine's details.

    PYTHONPATH=src python benchmarks/bench_inference.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mnistrec.backends import OnnxBackend, TorchBackend, resolve_backend  # noqa: E402
from mnistrec.export import OPSET, export_metadata, onnx_model_proto  # noqa: E402
from mnistrec.models import create_model, model_names  # noqa: E402
from machine import cpu_model, load_average  # noqa: E402

BATCH_SIZES = (1, 64, 1024)


def throughput(run, batch: torch.Tensor, seconds: float, repeats: int) -> tuple[float, float]:
    """(images per second of wall time, images per second of this process's CPU time), best of ``repeats`` loops.

    On a shared, overloaded machine the wall-clock rate mostly measures how much CPU
    the other users left us; the CPU-time rate (all threads' CPU seconds summed) is
    what one dedicated core would do, minus the time threads spend spinning.
    """
    for _ in range(3):  # warm-up: allocator, thread pools, onnxruntime's first-run planning
        run(batch)
    best, best_cpu = 0.0, 0.0
    for _ in range(repeats):
        calls, start, cpu_start = 0, time.perf_counter(), time.process_time()
        while True:
            run(batch)
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        cpu = max(time.process_time() - cpu_start, 1e-9)
        best, best_cpu = max(best, calls * len(batch) / elapsed), max(best_cpu, calls * len(batch) / cpu)
    return best, best_cpu


def latency(run, calls: int) -> dict[str, float]:
    """Milliseconds for one image, one call at a time (median and p99)."""
    image = torch.rand(1, 1, 28, 28)
    for _ in range(20):
        run(image)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        run(image)
        times.append(time.perf_counter() - start)
    times.sort()
    return {"median_ms": round(1e3 * statistics.median(times), 4), "p99_ms": round(1e3 * times[int(0.99 * (len(times) - 1))], 4)}


def parse_spec(spec: str) -> tuple[str, dict]:
    """``name`` or ``name:key=int,...`` (e.g. ``ensemble:size=5``, what the ensemble recipe writes)."""
    name, _, options = spec.partition(":")
    kwargs = {k: int(v) for k, v in (item.split("=", 1) for item in options.split(",") if item)}
    return name, kwargs


def default_specs() -> list[str]:
    """Every registered model; the ensemble as the ensemble recipe makes it (5 members)."""
    return ["ensemble:size=5" if name == "ensemble" else name for name in model_names()]


def bench_model(spec: str, seconds: float, repeats: int, latency_calls: int, threads: int) -> dict:
    torch.manual_seed(0)
    name, kwargs = parse_spec(spec)
    model = create_model(name, **kwargs).eval()
    backends = {
        "torch": TorchBackend(model, name),
        "onnx": OnnxBackend.from_bytes(onnx_model_proto(model, export_metadata(name, kwargs)).SerializeToString(), threads=threads),
    }
    images = torch.rand(max(BATCH_SIZES), 1, 28, 28, generator=torch.Generator().manual_seed(0))
    # What `--backend auto` (the default of evaluate, predict and serve) runs for this model.
    row: dict = {"model": spec, "parameters": sum(p.numel() for p in model.parameters()), "auto": resolve_backend("auto", name)}
    for key, backend in backends.items():
        rates = {str(b): throughput(backend.predict_logits, images[:b], seconds, repeats) for b in BATCH_SIZES}
        row[key] = {
            "images_per_s": {b: round(wall) for b, (wall, _) in rates.items()},
            "images_per_cpu_s": {b: round(cpu) for b, (_, cpu) in rates.items()},
            "latency": latency(backend.predict_logits, latency_calls),
        }
        per_image = row[key]["images_per_s"]["1"]
        row[key]["speedup_vs_per_image_loop"] = {str(b): round(row[key]["images_per_s"][str(b)] / per_image, 2) for b in BATCH_SIZES}
        print(f"  {name:<12} {key:<6} " + "  ".join(f"b{b}: {row[key]['images_per_s'][str(b)]:>9,}/s" for b in BATCH_SIZES)
              + f"  latency {row[key]['latency']['median_ms']:.3f} ms", flush=True)
    row["onnx_vs_torch"] = {str(b): round(row["onnx"]["images_per_s"][str(b)] / row["torch"]["images_per_s"][str(b)], 2) for b in BATCH_SIZES}
    return row


def markdown(result: dict) -> str:
    lines = [
        "| model | backend | batch 1 img/s | batch 64 img/s | batch 1024 img/s | batch 1024 img/CPU-s | latency median (p99) | onnx/torch at 1024 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["models"]:
        for key in ("torch", "onnx"):
            ips = row[key]["images_per_s"]
            lat = row[key]["latency"]
            ratio = f"{row['onnx_vs_torch']['1024']:.2f}x" if key == "onnx" else ""
            label = f"{key} (auto)" if row.get("auto") == key else key
            lines.append(f"| {row['model']} | {label} | {ips['1']:,} | {ips['64']:,} | {ips['1024']:,} | "
                         f"{row[key]['images_per_cpu_s']['1024']:,} | "
                         f"{lat['median_ms']:.3f} ms ({lat['p99_ms']:.3f}) | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None, help="models to measure (default: every registered model)")
    parser.add_argument("--seconds", type=float, default=0.5, help="length of one timed loop (default: 0.5)")
    parser.add_argument("--repeats", type=int, default=3, help="timed loops per measurement; the best counts (default: 3)")
    parser.add_argument("--latency-calls", type=int, default=500, help="single-image calls for the latency (default: 500)")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads for PyTorch and onnxruntime (default 0: their defaults, one per core)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "inference.json")
    args = parser.parse_args()

    import onnxruntime

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = load_average()
    started = time.perf_counter()
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}, "
          f"{os.cpu_count()} cores, load average {load_before}")
    rows = [bench_model(name, args.seconds, args.repeats, args.latency_calls, args.threads) for name in (args.models or default_specs())]
    result = {
        "benchmark": "inference",
        "command": "PYTHONPATH=src python benchmarks/bench_inference.py " + " ".join(sys.argv[1:]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "onnxruntime_threads": args.threads or "default (one per physical core)",
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": str(torch.__version__),
            "onnxruntime": onnxruntime.__version__,
            "onnx_opset": OPSET,
            "load_average_before": load_before,
            "load_average_after": load_average(),
            "note": ("quiet: the 1-minute load average was below the core count before the run"
                     if load_before[0] < (os.cpu_count() or 1) else
                     "shared: other jobs were running (load average at or above the core count before the run), so "
                     "absolute numbers are pessimistic and noisy; the ratios are measured in one run"),
        },
        "method": "untrained weights (speed does not depend on them), random [N,1,28,28] float input, "
                  "through mnistrec.backends predict_logits (what evaluate/predict/serve call); throughput is the best "
                  f"of {args.repeats} loops of >= {args.seconds}s after warm-up; latency over {args.latency_calls} single-image calls",
        "images_per_cpu_s": "images per second of this process's CPU time (all threads summed): what one dedicated "
                            "core does, the load-independent figure on a shared machine",
        "reference": "onnx_vs_torch: onnxruntime / PyTorch images per second at the same batch size; "
                     "speedup_vs_per_image_loop: batched / batch-1 images per second of the same backend",
        "models": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(markdown(result))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
