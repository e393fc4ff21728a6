"""`make benchmarks` keeps working: the seed-pipeline script runs end to end on a tiny subset.

This checks that the script runs and writes a complete result; it does not time anything.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, cli_env


def test_seed_pipeline_benchmark_writes_its_json(tmp_path, data_dir):
    out = tmp_path / "seed_pipeline.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_seed_pipeline.py"), "--data-dir", str(data_dir),
         "--epochs", "1", "--repeats", "2", "--limit-train", "320", "--limit-test", "320", "--out", str(out)],
        env=cli_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["train_images"] == 320 and report["test_images"] == 320 and report["epochs"] == 1
    for side in ("seed_style", "plain_loop", "ours"):
        assert report[side]["seconds"] > 0 and 0.15 < report[side]["test_accuracy"] <= 1.0
    assert report["ratio_ours_over_seed_style"] == round(report["ours"]["seconds"] / report["seed_style"]["seconds"], 4)
    # Two alternating (plain loop, ours) pairs; the reported ratio is the median of the pair ratios.
    assert len(report["plain_loop"]["runs_seconds"]) == len(report["ours"]["runs_seconds"]) == 2
    pairs = [o / p for p, o in zip(report["plain_loop"]["runs_seconds"], report["ours"]["runs_seconds"])]
    assert report["ratio_ours_over_plain_loop"] == pytest.approx(sum(pairs) / 2, abs=1e-4)
    assert report["target_ratio_plain_loop"] == 1.0
    fastest = min(report["ours"]["runs_seconds"]) / min(report["plain_loop"]["runs_seconds"])
    assert report["ratio_ours_over_plain_loop_fastest"] == round(fastest, 4)
    assert report["machine"]["cores"] >= 1 and report["machine"]["torch"] and report["machine"]["cpu"]
    assert "ratio ours / seed-style" in result.stdout and "ratio ours / plain loop" in result.stdout
