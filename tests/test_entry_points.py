"""The seed's own entry points from the repository root: the script and the notebook."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys


from conftest import REPO, SRC

PICTURES = ("curves.png", "predictions.png", "confusion.png", "mistakes.png")


def test_mnist_recognition_script_runs_the_seed_recipe(tmp_path, data_dir):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the script must find the package itself
    env["MNIST_DATA_DIR"] = str(data_dir)
    result = subprocess.run(
        [sys.executable, str(REPO / "mnist_recognition.py"), "--limit-train", "2000", "--limit-test", "400", "--epochs", "2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    epochs = re.findall(r"^Epoch (\d)/2, Train Loss: [\d.]+, Train Acc: [\d.]+%, Test Loss: [\d.]+, Test Acc: ([\d.]+)%$",
                        result.stdout, re.M)
    assert [e for e, _ in epochs] == ["1", "2"], result.stdout
    assert float(epochs[-1][1]) > 70
    # Where the seed saved its weights, plus the run directory with the pictures.
    assert (tmp_path / "mnist_model.pth").is_file()
    run = tmp_path / "runs" / "seed"
    for name in PICTURES:
        assert (run / name).stat().st_size > 1000
    assert json.loads((run / "metrics.json").read_text())["config"]["epochs"] == 2


NOTEBOOK = REPO / "MNIST_Recognition_machine.ipynb"


def test_committed_notebook_has_no_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert any("parameters" in c.metadata.get("tags", []) for c in code)


def test_notebook_executes_headless_on_a_subset(tmp_path, data_dir, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    # The kernel is started from this environment: it must import this checkout's package.
    monkeypatch.setenv("PYTHONPATH", str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("MNIST_DATA_DIR", str(data_dir))
    monkeypatch.setenv("MNISTREC_NOTEBOOK_LIMIT", "2000")
    monkeypatch.setenv("MNISTREC_NOTEBOOK_EPOCHS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}}).execute()

    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "stream")
    assert re.search(r"^Epoch 1/1, Train Loss: [\d.]+, Train Acc: [\d.]+%, Test Loss", text, re.M), text
    accuracy = re.search(r"^Test accuracy: ([\d.]+)% on 400 images$", text, re.M)
    assert accuracy and float(accuracy.group(1)) > 70, text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # samples, curves, predictions, confusion matrix, mistakes
    assert (tmp_path / "mnist_model.pth").is_file()
    from mnistrec.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "mnist_model.pth").meta["metrics"]["count"] == 400
