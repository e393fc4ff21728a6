"""`make benchmarks` keeps working: the seed-pipeline script runs end to end on a tiny subset.

This checks that the script runs and writes a complete result; it does not time anything.
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, cli_env


def test_seed_pipeline_benchmark_writes_its_json(tmp_path, data_dir):
    out = tmp_path / "seed_pipeline.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_seed_pipeline.py"), "--data-dir", str(data_dir),
         "--epochs", "1", "--limit-train", "320", "--limit-test", "320", "--out", str(out)],
        env=cli_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["train_images"] == 320 and report["test_images"] == 320 and report["epochs"] == 1
    for side in ("seed_style", "ours"):
        assert report[side]["seconds"] > 0 and 0.15 < report[side]["test_accuracy"] <= 1.0
    assert report["ratio_ours_over_seed_style"] == round(report["ours"]["seconds"] / report["seed_style"]["seconds"], 4)
    assert report["machine"]["cores"] >= 1 and report["machine"]["torch"] and report["machine"]["cpu"]
    assert "ratio ours / seed-style" in result.stdout
