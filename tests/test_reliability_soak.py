"""A 15-second version of ``benchmarks/soak_serve.py`` against a real server on 127.0.0.1:
valid requests never fail, bad ones always get a 4xx, memory stays bounded."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, cli_env

pytestmark = pytest.mark.slow


def test_short_soak_valid_never_fail_bad_always_4xx_memory_bounded(mlp_checkpoint, tmp_path, data_dir):
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "soak_serve.py"), "--seconds", "15", "--clients", "3",
         "--checkpoint", str(mlp_checkpoint), "--out", str(out)],
        cwd=REPO, env=cli_env(MNIST_DATA_DIR=str(data_dir), OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300,
    )
    report = json.loads(out.read_text())
    assert result.returncode == 0, result.stdout + result.stderr
    assert report["passed"] and report["server_alive_at_end"]
    assert report["valid"]["ok"] >= 50 and report["valid"]["failed"] == 0
    assert report["bad"]["sent"] >= 10 and report["bad"]["not_4xx"] == 0 and report["bad"]["got_4xx"] == report["bad"]["sent"]
    assert report["rss_mb"]["growth"] <= report["rss_mb"]["bound"]
    assert report["machine"]["cores"] and report["machine"]["torch"]
