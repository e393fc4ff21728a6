"""Test accuracy against training time for every training recipe, on this machine, with issue 17's targets.

Each recipe runs as a user would run it, ``mnistrec train --recipe NAME`` in a
fresh subprocess. Two references are measured in the same run:

- the ``seed`` recipe (the original notebook): every recipe's time and error
  rate as a ratio to it (``vs_seed``);
- the plain in-memory loop of ``bench_seed_pipeline.py`` (5 epochs of the seed
  MLP on one normalised tensor, Adam at its defaults), run in its own process
  just before each recipe, after a few warm-up steps (the first steps of a
  process pay one-off costs, so a cold loop would be a slower and kinder
  reference). ``vs_plain_loop`` is the run's training seconds (``metrics.json``)
  over that loop's.

``seed`` runs ``--seed-repeats`` times (3), each after its own plain loop, and
reports the run with the median ratio: a 10-second run on a machine whose
speed drifts by 1.6x within minutes needs more than one pair. "Each after its
own plain loop" holds with ``--jobs 1`` (the default); with more jobs runs overlap. ``fast`` and
``best`` are run once per seed (``--fast-seeds``, ``--best-seeds``).
The ``ensemble`` recipe's members are ``best`` runs with seeds 42 to 46 (member I
has the same model, data order and augmentation as ``--recipe best --seed 42+I``),
so when ``best`` is not run by seed its rows come from those members, each timed
by its own training time. Every run is judged against issue 17's targets
(``TARGETS``) in its ``meets`` entry; the recipes' summaries judge the means.

Output: ``benchmarks/results/recipes.json`` (with machine details and the load
average, since the machine may be shared) and ``docs/images/recipes.png``.

    python benchmarks/bench_recipes.py --recipes seed,ensemble --separate-fast --fast-seeds 42,43,44 --threads 2
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

# Issue 17's bars. Times are training seconds (RUN_DIR/metrics.json -> seconds).
TARGETS = {
    "seed": {"max_vs_plain_loop": 1.0},
    "fast": {"min_test_accuracy": 0.996, "max_vs_plain_loop": 4.0},
    "best": {"min_test_accuracy": 0.997, "min_mean_test_accuracy": 0.9975, "max_train_seconds": 900},
    "ensemble": {"min_test_accuracy": 0.998},
}

# The plain loop, in a process of its own: 3,000 images of warm-up, then the timed 5 epochs on all 60,000.
PLAIN_LOOP = """
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from bench_seed_pipeline import run_plain_loop
from mnistrec.data import load_mnist
if int(sys.argv[3]):
    torch.set_num_threads(int(sys.argv[3]))
run_plain_loop(load_mnist(sys.argv[2], limit_train=3000, limit_test=100), 1, 0)
print(json.dumps(run_plain_loop(load_mnist(sys.argv[2]), 5, 42)))
"""


def plain_loop_seconds(data_dir: str, threads: int) -> float:
    """Training seconds of the plain in-memory loop (5 epochs of the seed MLP), warmed up, in a fresh process."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", PLAIN_LOOP, str(REPO / "benchmarks"), data_dir, str(threads)],
                          env=env, capture_output=True, text=True, check=True)
    return round(json.loads(done.stdout.strip().splitlines()[-1])["seconds"], 2)


def run_recipe(recipe: str, run_dir: Path, data_dir: str, threads: int, extra: list[str], plain: bool = True,
               processes: int = 1) -> dict:
    """``mnistrec train --recipe RECIPE`` in a subprocess, timing the plain loop before it (and after it too when
    the run is long): wall-clock, the plain loop's seconds and the run's metrics.json. With ``processes`` > 1 the
    run is started by torchrun on this machine (``threads`` per process)."""
    plain_seconds = [plain_loop_seconds(data_dir, threads)] if plain else []
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*(launcher if processes > 1 else [sys.executable]), "-m", "mnistrec", "train", "--recipe", recipe,
               "--out", str(run_dir), "--save", "", "--no-plots", "--quiet", "--data-dir", data_dir, *extra]
    if threads:
        command += ["--threads", str(threads)]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    load_before = load_average()
    start = time.perf_counter()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        code = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    load_after = load_average()
    if plain and wall > 300:  # the machine may have changed over a long run: time the reference after it too
        plain_seconds.append(plain_loop_seconds(data_dir, threads))
    started_as = f"torchrun --standalone --nproc_per_node {processes} -m mnistrec" if processes > 1 else "mnistrec"
    run = {"recipe": recipe, "command": f"{started_as} train --recipe {recipe}" + "".join(f" {a}" for a in extra),
           "processes": processes, "threads_per_process": threads,
           "wall_seconds": round(wall, 1), "timing": "wall-clock of the whole `mnistrec train` process (or torchrun)",
           "load_before": load_before, "load_after": load_after, "plain_loop_seconds": plain_seconds}
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
           "train_seconds": s["seconds"], "load_before": run["load_before"], "load_after": run["load_after"],
           "processes": run.get("processes", s.get("world_size", 1)),
           "threads_per_process": run.get("threads_per_process", s["config"].get("threads") or None)}
    plain = run.get("plain_loop_seconds")
    if plain:
        row["plain_loop_seconds"] = statistics.fmean(plain)
        row["vs_plain_loop"] = round(s["seconds"] / row["plain_loop_seconds"], 3)
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


def best_from_ensemble(ensemble: dict) -> dict:
    """The ``best`` row from the ensemble's members, each a ``--recipe best --seed S`` run (module docstring)."""
    members = ensemble["members"]
    threads, processes = ensemble.get("threads_per_process") or "default", ensemble.get("processes", 1)
    how = f"in one of {processes} processes sharing the machine" if processes > 1 else "one member at a time"
    return {"source": "the ensemble recipe's members, each identical to --recipe best --seed S; "
                      f"time = each member's own training time, on {threads} thread(s) {how}",
            "seeds": [m["seed"] for m in members],
            "runs": {f"best-seed{m['seed']}": {"test_accuracy": m["test_accuracy"], "train_seconds": m["seconds"]}
                     for m in members},
            "wall_seconds": mean_std([m["seconds"] for m in members]),
            "test_accuracy": mean_std([m["test_accuracy"] for m in members])}


def per_seed(name: str, runs: dict[str, dict]) -> dict:
    """A recipe run once per seed: every run's row, and the mean ± std of their accuracy and time."""
    done = {key: row for key, row in runs.items() if "test_accuracy" in row}
    summary: dict = {"source": f"separate runs of --recipe {name}", "runs": runs,
                     "incomplete": [key for key in runs if key not in done]}
    if done:
        summary["test_accuracy"] = mean_std([r["test_accuracy"] for r in done.values()])
        summary["wall_seconds"] = mean_std([r["wall_seconds"] for r in done.values()])
        summary["train_seconds"] = mean_std([r["train_seconds"] for r in done.values()])
    return summary


def median_seed_run(rows: list[dict]) -> dict:
    """The ``seed`` run with the median ratio to its plain loop (each timed just after its own), with every ratio.

    With an even count the upper of the two middle runs is reported (the less flattering one); runs that did not
    finish are listed under ``incomplete``.
    """
    timed = sorted((row for row in rows if "vs_plain_loop" in row), key=lambda row: row["vs_plain_loop"])
    if not timed:
        return rows[0]
    failed = [row.get("incomplete", "no plain loop") for row in rows if "vs_plain_loop" not in row]
    repeats = [{k: row[k] for k in ("train_seconds", "plain_loop_seconds", "vs_plain_loop", "test_accuracy")}
               for row in timed]
    return {**timed[len(timed) // 2], "repeats": repeats, **({"incomplete": failed} if failed else {})}


def judge(recipes: dict[str, dict]) -> None:
    """Add ``meets`` (each of :data:`TARGETS` -> True/False) to every run and recipe summary that has the figures."""

    def check(row: dict, target: dict, accuracy: float | None) -> dict:
        meets = {}
        if "min_test_accuracy" in target and accuracy is not None:
            meets["min_test_accuracy"] = accuracy >= target["min_test_accuracy"]
        if "max_vs_plain_loop" in target and "vs_plain_loop" in row:
            meets["max_vs_plain_loop"] = row["vs_plain_loop"] <= target["max_vs_plain_loop"]
        if "max_train_seconds" in target and "train_seconds" in row:
            meets["max_train_seconds"] = row["train_seconds"] <= target["max_train_seconds"]
        return meets

    for name, summary in recipes.items():
        target = TARGETS.get(name, {})
        for run in summary.get("runs", {}).values():
            if "test_accuracy" in run:
                run["meets"] = check(run, target, run["test_accuracy"])
        if "test_accuracy" not in summary:
            continue
        if "runs" not in summary:  # a single run
            summary["meets"] = check(summary, target, summary["test_accuracy"])
            continue
        runs = [r for r in summary["runs"].values() if "meets" in r]
        summary["meets"] = {key: all(r["meets"][key] for r in runs) for key in runs[0]["meets"]}
        if "min_mean_test_accuracy" in target:
            summary["meets"]["min_mean_test_accuracy"] = mean_of(summary["test_accuracy"]) >= target["min_mean_test_accuracy"]
        if name == "fast":  # issue 17 judges `fast` on the mean of its seeds
            summary["meets"]["min_test_accuracy"] = mean_of(summary["test_accuracy"]) >= target["min_test_accuracy"]


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
    ax.set_ylim(top=99.9)
    for target, text, va in ((99.6, "fast", "top"), (99.7, "best", "bottom"), (99.8, "ensemble", "bottom")):
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
    parser.add_argument("--best-seeds", default="", help="also run `best` on its own for each of these seeds "
                        "(default none: its rows come from the ensemble's members)")
    parser.add_argument("--seed-repeats", type=int, default=3, help="run `seed` this many times, each after its own "
                        "plain loop, and report the run with the median ratio (short runs on a noisy machine)")
    parser.add_argument("--no-plain-loop", action="store_true", help="skip the plain-loop reference (smoke tests only)")
    parser.add_argument("--ensemble-procs", type=int, default=1, help="start the ensemble under torchrun with this "
                        "many processes on this machine (they share out its members; --threads is per process)")
    parser.add_argument("--jobs", type=int, default=1, help="recipes run at the same time (each is timed on its own)")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch threads per run (default 1: best on a busy machine)")
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "bench"), help="where the run directories go")
    parser.add_argument("--train-args", default="", help="extra `mnistrec train` flags for every run (smoke tests only)")
    parser.add_argument("--results", default=str(RESULTS), help="JSON output path")
    parser.add_argument("--plot", default=str(PLOT), help="PNG output path")
    parser.add_argument("--collect", action="store_true", help="run nothing: report the run directories already in --work-dir")
    parser.add_argument("--note", default="", help="free text stored in the JSON, e.g. how loaded the machine was")
    args = parser.parse_args()
    if args.seed_repeats < 1 or args.ensemble_procs < 1 or args.jobs < 1:
        parser.error("--seed-repeats, --ensemble-procs and --jobs must be at least 1")

    import torch

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    common = args.train_args.split()
    jobs: list[tuple[str, str, list[str]]] = []
    for recipe in filter(None, args.recipes.split(",")):
        jobs.append((recipe, recipe, common))
        if recipe == "seed" and not args.collect:  # --collect reads the one `seed` run directory
            jobs += [(f"seed-repeat{i}", "seed", common) for i in range(2, args.seed_repeats + 1)]
    if args.separate_fast:  # first: the short runs
        jobs = [(f"fast-seed{s}", "fast", ["--seed", s, *common]) for s in args.fast_seeds.split(",")] + jobs
    jobs += [(f"best-seed{s}", "best", ["--seed", s, *common]) for s in args.best_seeds.split(",") if s]
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    load_start = load_average()
    with ThreadPoolExecutor(args.jobs) as pool:
        if args.collect:
            futures = {name: pool.submit(collect, recipe, work / name, extra) for name, recipe, extra in jobs}
        else:
            futures = {name: pool.submit(run_recipe, recipe, work / name, args.data_dir, args.threads, extra,
                                         not args.no_plain_loop, args.ensemble_procs if recipe == "ensemble" else 1)
                       for name, recipe, extra in jobs}
        runs = {name: describe(f.result()) for name, f in futures.items()}

    seeded = ("fast-seed", "best-seed", "seed-repeat")
    recipes: dict[str, dict] = {name: row for name, row in runs.items() if not name.startswith(seeded)}
    if "seed" in recipes:
        recipes["seed"] = median_seed_run([row for key, row in runs.items() if key == "seed" or key.startswith("seed-repeat")])
    for name in ("fast", "best"):
        by_seed = {key: row for key, row in runs.items() if key.startswith(f"{name}-seed")}
        if by_seed:
            recipes[name] = per_seed(name, by_seed)
    if "best" not in recipes and "members" in runs.get("ensemble", {}):
        recipes["best"] = best_from_ensemble(runs["ensemble"])
    add_ratios_to_seed(recipes)
    judge(recipes)
    results = {
        "benchmark": "bench_recipes",
        "started": started,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads_per_run": args.threads, "parallel_jobs": args.jobs,
                    "load_average_start": load_start, "load_average_end": load_average(),
                    "note": args.note or "not known to be shared"},
        "targets": TARGETS,
        "recipes": recipes,
    }
    results_path, plot_path = Path(args.results), Path(args.plot)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, plot_path)
    print(json.dumps({k: {kk: v for kk, v in row.items() if kk in ("test_accuracy", "test_accuracy_tta", "train_seconds",
                                                                   "vs_plain_loop", "meets", "incomplete")}
                      for k, row in recipes.items()}, indent=2))
    print(f"wrote {results_path} and {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
