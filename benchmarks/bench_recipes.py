"""Test accuracy against wall-clock time for every training recipe, on this machine.

Each recipe runs as a user would run it, ``mnistrec train --recipe NAME`` in a
fresh subprocess, and its wall-clock time is measured around that process
(start-up and data loading included). The ``seed`` recipe (the original
notebook) is the reference measured in the same run: the JSON gives every
recipe's time and error rate as a ratio to it.

``fast`` is reported as mean ± std over several seeds (``--separate-fast``). To
save CPU the ``ensemble`` recipe and ``best`` are not both run: the ensemble's
members are ``best`` runs with seeds 42 to 46 (member I has the same model, data
order and augmentation as ``--recipe best --seed 42+I``), so unless ``best`` is
asked for by name its row is the mean ± std over those members, each timed by
its own training time.

Output: ``benchmarks/results/recipes.json`` (with machine details and the load
average, since the machine may be shared) and ``docs/images/recipes.png``.

    python benchmarks/bench_recipes.py --recipes seed,ensemble --separate-fast --jobs 1 --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from machine import cpu_model, load_average

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "recipes.json"
PLOT = REPO / "docs" / "images" / "recipes.png"


def run_recipe(recipe: str, run_dir: Path, data_dir: str, threads: int, extra: list[str]) -> dict:
    """``mnistrec train --recipe RECIPE`` in a subprocess; wall-clock and the run's metrics.json."""
    command = [sys.executable, "-m", "mnistrec", "train", "--recipe", recipe, "--out", str(run_dir), "--save", "",
               "--no-plots", "--quiet", "--data-dir", data_dir, *extra]
    if threads:
        command += ["--threads", str(threads)]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    load_before = load_average()
    start = time.perf_counter()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        code = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    run = {"recipe": recipe, "command": "mnistrec train --recipe " + recipe + "".join(f" {a}" for a in extra),
           "wall_seconds": round(wall, 1), "timing": "wall-clock of the whole `mnistrec train` process",
           "load_before": load_before, "load_after": load_average()}
    if code != 0:
        return {**run, **incomplete(run_dir, f"exit code {code}")}
    return {**run, "summary": json.loads((run_dir / "metrics.json").read_text())}


def incomplete(run_dir: Path, reason: str) -> dict:
    """What an unfinished run got through: its completed epochs from ``last.pth``."""
    import torch

    found: dict = {"incomplete": reason}
    state_path = run_dir / "last.pth"
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        found["completed_epochs"] = f"{state['epoch']}/{state['config']['epochs']}"
        found["history"] = state["history"]
    return found


def collect(recipe: str, run_dir: Path, extra: list[str]) -> dict:
    """A run finished (or stopped) earlier, e.g. outside this process: read its files, run nothing."""
    run = {"recipe": recipe, "command": "mnistrec train --recipe " + recipe + "".join(f" {a}" for a in extra),
           "load_before": None, "load_after": None}
    if not (run_dir / "metrics.json").is_file():
        return {**run, **incomplete(run_dir, "no metrics.json: the run did not finish")}
    summary = json.loads((run_dir / "metrics.json").read_text())
    return {**run, "wall_seconds": summary["seconds"], "summary": summary,
            "timing": "seconds measured inside train() (metrics.json): process start-up and data loading excluded"}


def describe(run: dict) -> dict:
    """The numbers that matter from one run's metrics.json."""
    if "summary" not in run:
        return run
    s = run["summary"]
    row = {"recipe": run["recipe"], "command": run["command"], "wall_seconds": run["wall_seconds"], "timing": run["timing"],
           "train_seconds": s["seconds"], "load_before": run["load_before"], "load_after": run["load_after"]}
    if s["model"] == "ensemble":
        row.update(test_accuracy=s["test"]["accuracy"], test_accuracy_tta=(s.get("test_tta") or {}).get("accuracy"),
                   val_accuracy=s.get("val_accuracy"), val_accuracy_tta=s.get("val_accuracy_tta"), members=s["members"])
    else:
        row.update(test_accuracy=s["test"]["accuracy"], best_epoch=s.get("best_epoch"),
                   val_accuracy=s.get("best_val_accuracy"), epochs=s["config"]["epochs"], model=s["model"])
    return row


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def mean_of(value: float | dict) -> float:
    """A single run's figure, or the mean of a ``mean_std`` one."""
    return value["mean"] if isinstance(value, dict) else value


def best_from_ensemble(members: list[dict]) -> dict:
    """The ``best`` row from the ensemble's members, each a ``--recipe best --seed S`` run (module docstring)."""
    return {"source": "the ensemble recipe's members, each identical to --recipe best --seed S; "
                      "time = each member's own training time",
            "seeds": [m["seed"] for m in members],
            "wall_seconds": mean_std([m["seconds"] for m in members]),
            "test_accuracy": mean_std([m["test_accuracy"] for m in members])}


def add_ratios_to_seed(recipes: dict[str, dict]) -> None:
    """Each finished recipe's time and error rate as a ratio to the ``seed`` reference of the same run."""
    reference = recipes.get("seed")
    if not reference or "test_accuracy" not in reference:
        return
    for row in recipes.values():
        if "test_accuracy" not in row:
            continue
        row["vs_seed"] = {"time_ratio": round(mean_of(row["wall_seconds"]) / reference["wall_seconds"], 3),
                          "error_ratio": round((1 - mean_of(row["test_accuracy"])) / (1 - reference["test_accuracy"]), 3)}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    done = {name: row for name, row in results["recipes"].items() if "test_accuracy" in row}
    ref = done.get("seed")
    if ref:
        ax.scatter([ref["wall_seconds"]], [100 * ref["test_accuracy"]], marker="s", color="grey", label="seed (MLP, reference)")
    for name, marker, color in (("fast", "o", "C0"), ("best", "D", "C1")):
        row = done.get(name)
        if row is None:
            continue
        if not isinstance(row["test_accuracy"], dict):  # `best` run by name: one seed
            ax.scatter([row["wall_seconds"]], [100 * row["test_accuracy"]], marker=marker, color=color, label=f"{name} (one seed)")
            continue
        ax.scatter(row["wall_seconds"]["values"], [100 * v for v in row["test_accuracy"]["values"]], marker=marker,
                   color=color, alpha=0.4)
        ax.errorbar(row["wall_seconds"]["mean"], 100 * row["test_accuracy"]["mean"], xerr=row["wall_seconds"]["std"],
                    yerr=100 * row["test_accuracy"]["std"], fmt=marker, color=color, capsize=4,
                    label=f"{name} (mean ± std, {row['test_accuracy']['n']} seeds)")
    ens = done.get("ensemble")
    if ens:
        ax.scatter([ens["wall_seconds"]], [100 * ens["test_accuracy"]], marker="*", s=120, color="C2", label="ensemble")
        if ens.get("test_accuracy_tta") is not None:
            ax.scatter([ens["wall_seconds"]], [100 * ens["test_accuracy_tta"]], marker="*", s=120, color="C3", label="ensemble + TTA")
    ax.set_xscale("log")
    ax.set_ylim(top=99.85)
    for target, text, va in ((99.5, "fast", "bottom"), (99.7, "best", "top"), (99.75, "ensemble", "bottom")):
        ax.axhline(target, color="k", lw=0.5, ls=":")
        ax.text(ax.get_xlim()[0], target, f" {text} target {target}%", va=va, ha="left", fontsize=7)  # left: clear of the points
    ax.set_xlabel("wall-clock seconds (log scale)")
    ax.set_ylabel("test accuracy (%)")
    loaded = "shared" in results["machine"]["note"]
    ax.set_title(f"MNIST recipes on {results['machine']['cpu_count']} CPU cores"
                 + (" (shared, heavily loaded machine: times inflated)" if loaded else ""), fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR", str(REPO.parent / "shared" / "datasets" / "mnist")))
    parser.add_argument("--recipes", default="seed,ensemble", help="comma-separated recipes to run")
    parser.add_argument("--separate-fast", action="store_true", help="also run `fast` on its own for each --fast-seeds")
    parser.add_argument("--fast-seeds", default="42,43,44")
    parser.add_argument("--jobs", type=int, default=1, help="recipes run at the same time (each is timed on its own)")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch threads per run (default 1: best on a busy machine)")
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "bench"), help="where the run directories go")
    parser.add_argument("--train-args", default="", help="extra `mnistrec train` flags for every run (smoke tests only)")
    parser.add_argument("--results", default=str(RESULTS), help="JSON output path")
    parser.add_argument("--plot", default=str(PLOT), help="PNG output path")
    parser.add_argument("--collect", action="store_true", help="run nothing: report the run directories already in --work-dir")
    parser.add_argument("--note", default="", help="free text stored in the JSON, e.g. how loaded the machine was")
    args = parser.parse_args()

    import torch

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    common = args.train_args.split()
    jobs: list[tuple[str, str, list[str]]] = [(r, r, common) for r in args.recipes.split(",") if r]
    if args.separate_fast:  # first: the short runs
        jobs = [(f"fast-seed{s}", "fast", ["--seed", s, *common]) for s in args.fast_seeds.split(",")] + jobs
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    load_start = load_average()
    with ThreadPoolExecutor(args.jobs) as pool:
        if args.collect:
            futures = {name: pool.submit(collect, recipe, work / name, extra) for name, recipe, extra in jobs}
        else:
            futures = {name: pool.submit(run_recipe, recipe, work / name, args.data_dir, args.threads, extra)
                       for name, recipe, extra in jobs}
        runs = {name: describe(f.result()) for name, f in futures.items()}

    recipes: dict[str, dict] = {name: row for name, row in runs.items() if not name.startswith("fast-seed")}
    fast_runs = {name: row for name, row in runs.items() if name.startswith("fast-seed")}
    fast_rows = [row for row in fast_runs.values() if "test_accuracy" in row]
    if fast_rows:
        recipes["fast"] = {"source": "separate runs of --recipe fast",
                           "incomplete": [name for name, row in fast_runs.items() if "test_accuracy" not in row],
                           "test_accuracy": mean_std([r["test_accuracy"] for r in fast_rows]),
                           "wall_seconds": mean_std([r["wall_seconds"] for r in fast_rows])}
    if "best" not in recipes and "members" in runs.get("ensemble", {}):
        recipes["best"] = best_from_ensemble(runs["ensemble"]["members"])
    add_ratios_to_seed(recipes)
    results = {
        "benchmark": "bench_recipes",
        "started": started,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads_per_run": args.threads, "parallel_jobs": args.jobs,
                    "load_average_start": load_start, "load_average_end": load_average(),
                    "note": args.note or "not known to be shared"},
        "targets": {"fast": "test >= 99.5% in <= 90 s", "best": "test >= 99.7% in <= 15 min", "ensemble": "test >= 99.75%"},
        "recipes": recipes,
    }
    results_path, plot_path = Path(args.results), Path(args.plot)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, plot_path)
    print(json.dumps({k: {kk: v for kk, v in row.items() if kk in ("test_accuracy", "test_accuracy_tta", "wall_seconds", "incomplete")}
                      for k, row in recipes.items()}, indent=2))
    print(f"wrote {results_path} and {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
