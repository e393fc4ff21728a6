"""Corrections from the page (`serve --collect DIR`): off by default, server-chosen names, caps, 4xx for bad input,
the folder never served back, and `finetune --images DIR` reads what was saved."""

from __future__ import annotations

import base64
import io
import sys

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import REPO
from mnistrec.folders import load_labelled_images
from mnistrec.serve.app import create_app

sys.path.insert(0, str(REPO / "benchmarks"))
from writer_style import sample  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def png(digit: int = 7, seed: int = 0, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    sample(digit, np.random.default_rng(seed)).save(out, fmt)
    return out.getvalue()


def body(data: bytes, digit) -> dict:
    return {"image": "data:image/png;base64," + base64.b64encode(data).decode(), "digit": digit}


@pytest.fixture()
def collect(tmp_path):
    return tmp_path / "corrections"


@pytest.fixture()
def client(mlp_checkpoint, collect):
    app = create_app(mlp_checkpoint, collect_dir=collect, collect_max_files=3)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def test_off_by_default(mlp_checkpoint):
    with TestClient(create_app(mlp_checkpoint), raise_server_exceptions=False) as c:
        assert c.get("/api/corrections").status_code == 404
        assert c.post("/api/corrections", json=body(png(), 7)).status_code in (404, 405)


def test_a_correction_is_saved_as_sent_under_a_server_chosen_name(client, collect):
    assert client.get("/api/corrections").json() == {"enabled": True, "count": 0, "max_files": 3}
    data = png(7)
    response = client.post("/api/corrections", json=body(data, 7))
    assert response.status_code == 201, response.text
    saved = response.json()
    assert saved["digit"] == 7 and saved["count"] == 1
    files = list(collect.rglob("*.png"))
    assert [f.relative_to(collect).as_posix() for f in files] == [f"7/{saved['saved']}"]
    assert files[0].read_bytes() == data
    # What finetune reads from the folder.
    assert load_labelled_images(collect, cache_dir="").labels.tolist() == [7]


@pytest.mark.parametrize("digit", ["../../etc", "7/../../x", 10, -1, "seven", None, 3.5])
def test_the_client_cannot_choose_a_path(client, collect, digit):
    response = client.post("/api/corrections", json=body(png(), digit))
    assert response.status_code == 422, response.text
    assert list(collect.rglob("*.png")) == []


def test_bad_images_are_4xx_and_nothing_is_saved(client, collect):
    blank = io.BytesIO()
    Image.new("L", (140, 140), 255).save(blank, "PNG")
    cases = [
        (body(png(fmt="JPEG"), 1), 422, "PNG"),
        (body(blank.getvalue(), 1), 422, "ink"),
        (body(b"\x89PNG\r\n\x1a\n" + b"x" * 100, 1), 422, ""),
        ({"image": "not base64 !!", "digit": 1}, 422, "base64"),
        (body(b"\x89PNG\r\n\x1a\n" + b"\0" * 300_000, 1), 422, "at most"),  # refused by the schema's length
        ({"image": "", "digit": 1, "path": "/tmp/x.png"}, 422, ""),
    ]
    for payload, status, word in cases:
        response = client.post("/api/corrections", json=payload)
        assert response.status_code == status, (response.status_code, response.text)
        assert word.lower() in response.json()["detail"].lower()
    assert list(collect.rglob("*.png")) == []


def test_count_is_capped_and_the_folder_is_never_served(client, collect):
    for i in range(3):
        assert client.post("/api/corrections", json=body(png(4, seed=i), 4)).status_code == 201
    full = client.post("/api/corrections", json=body(png(4, seed=9), 4))
    assert full.status_code == 409 and "full" in full.json()["detail"]
    assert len(list(collect.rglob("*.png"))) == 3
    name = next(collect.rglob("*.png")).name
    for path in (f"/api/corrections/{name}", f"/api/corrections/4/{name}", f"/static/../corrections/4/{name}",
                 f"/static/4/{name}", f"/{collect.name}/4/{name}", f"/static/%2e%2e/{collect.name}/4/{name}"):
        assert client.get(path).status_code in (404, 405), path
