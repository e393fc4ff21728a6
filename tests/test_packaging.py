"""Packaging as a user meets it: the seed's requirements.txt path, and the wheel with the model and the page inside.

Each test works on a copy of the tracked files (what a fresh clone holds), so no
build output lands in the checkout. The slow ones create fresh virtual
environments and install into them from the local package index and the local
torch wheel (``/opt/wheels`` here, via pip's configured ``--find-links``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

TORCH_WHEELS = Path("/opt/wheels")  # the local CPU torch wheel on this project's machines
STATIC = ("index.html", "app.js", "style.css")


def tracked_copy(target: Path) -> Path:
    """The files ``git`` tracks in this checkout (plus uncommitted edits of them), copied to ``target``."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def clean_env() -> dict[str, str]:
    """The environment without anything pointing into this checkout (no PYTHONPATH to src/, no virtualenv)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def fresh_venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True).create(path)
    return path / "bin" / "python"


def pip_install(python: Path, *args: str, cwd: Path) -> None:
    links = ["--find-links", str(TORCH_WHEELS)] if TORCH_WHEELS.is_dir() else []
    result = subprocess.run([str(python), "-m", "pip", "install", "-q", *links, *args], cwd=cwd, env=clean_env(),
                            capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tracked_copy(tmp_path_factory.mktemp("source"))
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                             str(out), str(source)], env=clean_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (built,) = out.glob("mnistrec-*.whl")
    return built


def test_wheel_holds_the_shipped_model_and_the_pages_files(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert "mnistrec/default_model.pth" in names and "mnistrec/default_model.onnx" in names
        assert archive.read("mnistrec/default_model.pth") == (REPO / "src/mnistrec/default_model.pth").read_bytes()
        for name in STATIC:
            assert f"mnistrec/serve/static/{name}" in names, name
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "Provides-Extra: notebook" in metadata and "notebook==7.6.3" in metadata


def test_requirements_file_installs_the_seed_path_and_jupyter():
    lines = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    assert [line for line in lines if line and not line.startswith("#")] == [".[notebook]"]
    assert any("download.pytorch.org/whl/cpu" in line for line in lines)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_seed_path_in_a_fresh_venv(tmp_path, data_dir):
    """``pip install -r requirements.txt`` then ``python mnist_recognition.py``, as the seed says."""
    checkout = tracked_copy(tmp_path / "clone")
    python = fresh_venv(tmp_path / "venv")
    pip_install(python, "-r", "requirements.txt", cwd=checkout)
    result = subprocess.run([str(python), "mnist_recognition.py", "--epochs", "1", "--limit-train", "2000",
                             "--limit-test", "500", "--data-dir", str(data_dir), "--save", "", "--no-plots", "--quiet"],
                            cwd=checkout, env=clean_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Test Acc:" in result.stdout and "run directory: runs/seed" in result.stdout
    jupyter = subprocess.run([str(python.parent / "jupyter-notebook"), "--version"], env=clean_env(),
                             capture_output=True, text=True, timeout=300)
    assert jupyter.returncode == 0 and jupyter.stdout.strip() == "7.6.3", jupyter.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_installed_wheel_predicts_a_drawn_seven_outside_the_repository(wheel, tmp_path, mnist):
    from test_default_model import seven_png

    python = fresh_venv(tmp_path / "venv")
    pip_install(python, str(wheel), cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    image = seven_png(mnist, elsewhere / "seven.png")
    result = subprocess.run([str(python.parent / "mnistrec"), "predict", image.name, "--json"], cwd=elsewhere,
                            env=clean_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    prediction = json.loads(result.stdout)
    assert prediction["digit"] == 7 and prediction["unsure"] is False
    # It ran the installed copy, not this checkout.
    where = subprocess.run([str(python), "-c", "import mnistrec; print(mnistrec.__file__)"], cwd=elsewhere,
                           env=clean_env(), capture_output=True, text=True, timeout=300).stdout
    assert str(REPO) not in where and str(tmp_path / "venv") in where
