"""`--backend onnx` on `predict` and `serve` gives the predictions of the PyTorch backend."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import run_cli
from mnistrec.serve.app import create_app


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory, mnist):
    """Eight real MNIST test digits as PNG files, ink white on black as MNIST."""
    folder = tmp_path_factory.mktemp("digits")
    for i in range(8):
        Image.fromarray(mnist.test_images[i].numpy()).save(folder / f"{i}_{int(mnist.test_labels[i])}.png")
    return folder


def test_predict_backends_agree(mlp_checkpoint, digit_files, tmp_path):
    onnx_file = tmp_path / "m.onnx"
    assert run_cli("export", mlp_checkpoint, "-o", onnx_file).returncode == 0
    results = {}
    for label, (model, backend) in {"torch": (mlp_checkpoint, "torch"), "onnx": (onnx_file, "onnx")}.items():
        done = run_cli("predict", model, digit_files, "--json", "--backend", backend)
        assert done.returncode == 0, done.stderr
        results[label] = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results["torch"]) == 8
    for a, b in zip(results["torch"], results["onnx"]):
        assert a["path"] == b["path"] and a["digit"] == b["digit"]
        assert b["probabilities"] == pytest.approx(a["probabilities"], abs=1e-5)
    assert sum(r["digit"] == int(r["path"][-5]) for r in results["onnx"]) >= 7  # the real labels, in the names


def test_serve_onnx_backend_matches_torch(mlp_checkpoint, mnist):
    pixels = (mnist.test_images[:4].float() / 255).tolist()
    bodies = {}
    for backend in ("torch", "onnx"):
        with TestClient(create_app(mlp_checkpoint, backend=backend), raise_server_exceptions=False) as client:
            response = client.post("/api/predict/batch", json={"pixels": pixels})
            assert response.status_code == 200, response.text
            bodies[backend] = response.json()["predictions"]
    for a, b in zip(bodies["torch"], bodies["onnx"]):
        assert a["digit"] == b["digit"]
        assert b["probabilities"] == pytest.approx(a["probabilities"], abs=1e-5)
    assert [p["digit"] for p in bodies["onnx"]] == mnist.test_labels[:4].tolist()
