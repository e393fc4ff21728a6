"""The model shipped in the package: it scores what it records, and every command uses it by default."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, cli_env, run_cli
from mnistrec.checkpoint import default_checkpoint, load_checkpoint
from mnistrec.data import FILES


@pytest.fixture(scope="module")
def shipped():
    return load_checkpoint(default_checkpoint())


def seven_png(mnist, path: Path) -> Path:
    """A test-set 7 as a user would upload it: dark ink on white paper, off-centre on a bigger canvas."""
    index = int((mnist.test_labels == 7).nonzero()[0])
    digit = 255 - mnist.test_images[index].numpy()
    canvas = np.full((120, 100), 255, np.uint8)
    canvas[30:86, 20:76] = np.asarray(Image.fromarray(digit).resize((56, 56), Image.Resampling.BILINEAR))
    Image.fromarray(canvas).save(path)
    return path


def test_shipped_file_is_small_and_records_its_provenance(shipped):
    path = default_checkpoint()
    assert path.parent.name == "mnistrec" and path.stat().st_size <= 3_000_000
    meta = shipped.meta
    assert meta["recipe"] == "best" and meta["config"]["seed"] == 42 and meta["config"]["val_size"] == 5000
    assert meta["data_checksums"] == {name: f.sha256 for name, f in FILES.items()}
    calibration = meta["calibration"]
    assert "validation split" in calibration["fitted_on"] and "SEEN" not in calibration["fitted_on"]
    assert shipped.temperature == calibration["temperature"] != 1.0
    assert meta["shipped"]["command"] == "make default-model"


def test_shipped_model_scores_what_it_records(shipped, mnist):
    from mnistrec.evaluate import evaluate

    recorded = shipped.meta["metrics"]
    now = evaluate(shipped.inference_model, mnist.test_images, mnist.test_labels)
    assert now["count"] == recorded["count"] == 10000
    # Another CPU may round a borderline logit differently: allow one image either way, no more.
    assert abs(now["errors"] - recorded["errors"]) <= 1
    assert now["ece"] == pytest.approx(recorded["ece"], abs=5e-4)
    assert now["nll"] == pytest.approx(recorded["nll"], rel=0.02)
    # The bar the shipped model was chosen against.
    assert now["accuracy"] >= 0.996 and now["ece"] <= 0.010


def test_predict_evaluate_use_the_shipped_model_and_c_picks_another(mnist, mlp_checkpoint, tmp_path, data_dir):
    image = seven_png(mnist, tmp_path / "seven.png")
    default = run_cli("predict", image, "--json", cwd=tmp_path)
    assert default.returncode == 0, default.stderr
    result = json.loads(default.stdout)
    assert result["digit"] == 7 and result["unsure"] is False and result["confidence"] > 0.9

    other = run_cli("predict", "-c", mlp_checkpoint, image, "--json", cwd=tmp_path)
    old_form = run_cli("predict", mlp_checkpoint, image, "--json", cwd=tmp_path)
    assert other.returncode == old_form.returncode == 0, other.stderr + old_form.stderr
    assert json.loads(other.stdout) == json.loads(old_form.stdout) != result  # the MLP, not the shipped CNN

    both = run_cli("evaluate", mlp_checkpoint, "-c", mlp_checkpoint, cwd=tmp_path)
    assert both.returncode == 2 and "once" in both.stderr and both.stderr.count("\n") == 1

    evaluated = run_cli("evaluate", "--json", "--limit-test", "300", "--data-dir", data_dir, cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads(evaluated.stdout)
    assert Path(metrics["checkpoint"]) == default_checkpoint() and metrics["model"] == "cnn-wide"
    assert {"ece", "nll"} <= set(metrics)


def test_export_without_checkpoint_writes_into_the_current_folder(tmp_path):
    result = run_cli("export", "--format", "torchscript", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "mnistrec-default.pt").is_file()
    assert not (default_checkpoint().with_suffix(".pt")).exists()


@pytest.mark.slow
def test_serve_without_checkpoint_serves_the_shipped_calibrated_model(mnist, tmp_path, shipped):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from serving import running_server

    with running_server(None, tmp_path / "serve.log", env=cli_env(), start_timeout=120) as (url, _):
        described = httpx.get(url + "/api/model", timeout=30).json()
        assert described["architecture"] == "cnn-wide"
        assert described["calibration"]["temperature"] == shipped.temperature
        with open(seven_png(mnist, tmp_path / "seven.png"), "rb") as fh:
            answer = httpx.post(url + "/api/predict", files={"file": ("seven.png", fh, "image/png")}, timeout=60).json()
        assert answer["digit"] == 7 and answer["unsure"] is False


def test_make_default_model_trains_with_the_options_the_shipped_file_records(shipped):
    """`make default-model` reproduces the shipped file: its `mnistrec train` command (as `make -n` prints it)
    resolves to the training options the file records, whatever the recipe's defaults have become since."""
    from mnistrec.cli import build_parser
    from mnistrec.cli.train import config_overrides
    from mnistrec.training.config import TrainConfig, comparable, make_config

    if shutil.which("make") is None:
        pytest.skip("needs make")
    dry_run = subprocess.run(["make", "-n", "default-model"], cwd=REPO, capture_output=True, text=True, check=True)
    command = dry_run.stdout.replace("\\\n", " ")
    line = next(line for line in command.splitlines() if "-m mnistrec train" in line)
    args = build_parser().parse_args(shlex.split(line.split("-m mnistrec", 1)[1]))
    config = make_config(args.recipe, **config_overrides(args))
    recorded = TrainConfig(**shipped.meta["config"])
    # The thread count is not a training option (a run may resume on another), but it changes the weights' last bits.
    assert comparable(config) == comparable(recorded) and config.threads == recorded.threads
