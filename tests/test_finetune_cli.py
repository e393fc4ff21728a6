"""`mnistrec finetune` end to end in subprocesses: real image folders, provenance, predict/export on the result,
one-line errors for bad folders, and a real Ctrl-C followed by --resume giving the same weights."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, cli_env, run_cli

sys.path.insert(0, str(REPO / "benchmarks"))
from writer_style import write_folder  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = write_folder(tmp_path_factory.mktemp("style") / "mine", per_digit=3, seed=11)
    (root / "5" / "scan.png").write_bytes(b"not an image at all")
    return root


def test_finetune_writes_a_checkpoint_with_provenance_that_predict_and_export_take(folder, mlp_checkpoint, data_dir, tmp_path):
    run = tmp_path / "run"
    result = run_cli("finetune", "--images", folder, "-c", mlp_checkpoint, "--out", run, "--steps", "30",
                     "--threads", "1", "--data-dir", data_dir)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert sum("scan.png" in line for line in lines) == 1 and any("skipped" in line and "scan.png" in line for line in lines)
    assert any(line.startswith("MNIST test accuracy: ") and "->" in line for line in lines)
    assert any(line.startswith("temperature: ") for line in lines)  # kept or none: 3 per digit is too few to hold out
    assert result.stdout.strip() == str(run / "model.pth")

    saved = torch.load(run / "model.pth", weights_only=True)
    record = saved["finetune"]
    assert record["base"]["path"] == str(mlp_checkpoint.resolve()) and len(record["base"]["sha256"]) == 64
    assert record["images"]["count"] == 30 and record["images"]["skipped"] == ["5/scan.png"]
    assert {f["label"] for f in record["images"]["files"]} == set(range(10))
    assert 0 < record["after"]["mnist_test_accuracy"] <= 1 and record["held_out"] == 0
    assert saved["model_name"] == "mlp"

    predicted = run_cli("predict", "-c", run / "model.pth", folder / "7", "--json", "--quiet")
    assert predicted.returncode == 0 and len(predicted.stdout.splitlines()) == 3
    exported = run_cli("export", "-c", run / "model.pth", "--format", "torchscript", "-o", tmp_path / "m.pt")
    assert exported.returncode == 0, exported.stderr


@pytest.mark.parametrize("layout, message", [
    ("digit12", "sub-folders must be named by their digit, 0 to 9"),
    ("empty", "no images found"),
    ("unreadable", "none of its 1 image(s) could be read"),
])
def test_bad_folders_are_one_line_errors_with_exit_2(tmp_path, mlp_checkpoint, layout, message):
    root = tmp_path / layout
    (root / "12" if layout == "digit12" else root / "4").mkdir(parents=True)
    if layout == "unreadable":
        (root / "4" / "x.png").write_bytes(b"junk")
    result = run_cli("finetune", "--images", root, "-c", mlp_checkpoint, "--out", tmp_path / "run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("mnistrec: error: ") and message in lines[-1]
    # Before the error, one line per unreadable file, naming it.
    assert len(lines) == (2 if layout == "unreadable" else 1)
    if layout == "unreadable":
        assert lines[0].startswith(f"mnistrec: skipped {root / '4' / 'x.png'}: not an image")


def test_ctrl_c_then_resume_gives_the_weights_of_an_uninterrupted_run(folder, mlp_checkpoint, data_dir, tmp_path):
    options = ["--images", folder, "-c", mlp_checkpoint, "--steps", "160", "--threads", "1", "--data-dir", data_dir]
    straight = run_cli("finetune", *options, "--out", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr

    run = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, "-m", "mnistrec", "finetune", *map(str, options), "--out", str(run)],
                               env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run / "last.pth").exists():  # the first state is saved at step 50 of 160
        assert process.poll() is None and time.monotonic() < deadline, "no state saved"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    if process.returncode == 0:
        pytest.skip("the run finished before Ctrl-C arrived (very fast machine)")
    assert process.returncode == 130 and f"resume with: mnistrec finetune --resume {run}" in err

    resumed = run_cli("finetune", "--resume", run, "--data-dir", data_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    a = torch.load(tmp_path / "straight" / "model.pth", weights_only=True)["state_dict"]
    b = torch.load(run / "model.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    changed = run_cli("finetune", "--resume", run, "--steps", "5")
    assert changed.returncode == 2 and "give only --resume RUN_DIR" in changed.stderr
