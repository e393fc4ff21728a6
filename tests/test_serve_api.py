"""The HTTP API, through httpx against the real app and a real checkpoint.

Every endpoint, every input form, every limit; bad input is always a 4xx JSON
``{"detail": ...}`` (never a 500); concurrent requests share forward passes and
never block the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import threading

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mnistrec.checkpoint import load_checkpoint
from mnistrec.predict import predict_tensors
from mnistrec.preprocess import open_image, preprocess
from mnistrec.serve.app import create_app

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def app(mlp_checkpoint):
    return create_app(mlp_checkpoint, max_request_bytes=1_000_000, max_pixels=1_000_000, max_batch_images=8)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, raise_server_exceptions=False) as c:  # a bug shows up as a 500, which the tests reject
        yield c


@pytest.fixture(scope="module")
def model(mlp_checkpoint):
    return load_checkpoint(mlp_checkpoint).model


@pytest.fixture(scope="module")
def digits(mnist):
    """Ten real MNIST test digits as float [10, 1, 28, 28] and their labels."""
    return mnist.test_images[:10].float().div(255).unsqueeze(1), mnist.test_labels[:10]


def user_png(pixels: torch.Tensor, size: int = 120, offset: tuple[int, int] = (30, 10)) -> bytes:
    """A digit made to look like a user's picture: dark ink on white, scaled up, off-centre on a bigger page."""
    ink = Image.fromarray((pixels.reshape(28, 28).numpy() * 255).astype(np.uint8)).resize((56, 56), Image.BILINEAR)
    page = Image.new("L", (size, size), 0)
    page.paste(ink, offset)
    page = Image.eval(page, lambda v: 255 - v)
    buffer = io.BytesIO()
    page.save(buffer, "PNG")
    return buffer.getvalue()


def expected_for_file(model, data: bytes, top_k: int = 3) -> dict:
    """What the CLI's own functions say about an image file."""
    return predict_tensors(model, preprocess(open_image(data)).unsqueeze(0), top_k=top_k)[0]


def assert_prediction(body: dict, top_k: int = 3) -> None:
    assert set(body) >= {"digit", "confidence", "unsure", "probabilities", "top_k"}
    assert 0 <= body["digit"] <= 9 and len(body["probabilities"]) == 10
    assert abs(sum(body["probabilities"]) - 1) < 1e-4
    assert body["confidence"] == max(body["probabilities"]) == body["probabilities"][body["digit"]]
    assert len(body["top_k"]) == top_k and body["top_k"][0]["digit"] == body["digit"]


def assert_error(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail and "\n" not in detail and "Traceback" not in detail
    for word in words:
        assert word.lower() in detail.lower(), detail


# --------------------------------------------------------------------------- service endpoints


def test_health_and_model_describe_the_loaded_checkpoint(client, mlp_checkpoint):
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["model"] == "mnistrec"
    info = client.get("/api/model").json()
    assert info["architecture"] == "mlp" and info["parameters"] == 535_818
    assert info["checkpoint"]["sha256"] == hashlib.sha256(mlp_checkpoint.read_bytes()).hexdigest()
    assert info["checkpoint"]["bytes"] == mlp_checkpoint.stat().st_size
    assert 0.8 < info["metrics"]["accuracy"] <= 1.0
    assert info["input"]["shape"] == [-1, 1, 28, 28]


def test_page_and_its_assets_are_served_locally(client):
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    assert "http://" not in page.text.replace("http://www.w3.org", "") and "https://" not in page.text


def test_docs_load_their_javascript_from_this_server(client):
    docs = client.get("/docs")
    assert docs.status_code == 200
    sources = [part.split('"')[1] for part in docs.text.split("src=")[1:]] + \
              [part.split('"')[1] for part in docs.text.split("href=")[1:]]
    assert sources and all(s.startswith("/") for s in sources), sources
    for source in sources:
        assert client.get(source).status_code == 200, source


def test_openapi_document_is_valid_and_lists_every_route(client):
    import schemathesis
    from jsonschema import Draft202012Validator

    schema = client.get("/openapi.json").json()
    assert schema["openapi"].startswith("3.")
    for path in ("/api/predict", "/api/predict/batch", "/api/health", "/api/model", "/v2/health/live",
                 "/v2/health/ready", "/v2/models/{name}", "/v2/models/{name}/ready", "/v2/models/{name}/infer"):
        assert path in schema["paths"], path
    for component in schema["components"]["schemas"].values():
        Draft202012Validator.check_schema(component)
    body = schema["paths"]["/api/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json", "image/png"} <= set(body)
    batch = schema["paths"]["/api/predict/batch"]["post"]["requestBody"]["content"]
    assert batch["multipart/form-data"]["schema"]["properties"]["files"]["maxItems"] == 8
    assert batch["application/json"]["schema"]["properties"]["images"]["maxItems"] == 8
    operations = list(schemathesis.openapi.from_dict(schema).get_all_operations())
    assert len(operations) >= 10 and all(op.ok() for op in operations)


# --------------------------------------------------------------------------- /api/predict, every input form


def test_every_input_form_gives_the_cli_result(client, model, digits):
    images, _ = digits
    data = user_png(images[0])
    expected = expected_for_file(model, data)
    forms = {
        "multipart": client.post("/api/predict", files={"file": ("seven.png", data, "image/png")}),
        "raw body": client.post("/api/predict", content=data, headers={"content-type": "image/png"}),
        "octet-stream": client.post("/api/predict", content=data, headers={"content-type": "application/octet-stream"}),
        "base64": client.post("/api/predict", json={"image": base64.b64encode(data).decode()}),
        "data url": client.post("/api/predict", json={"image": "data:image/png;base64," + base64.b64encode(data).decode()}),
    }
    for name, response in forms.items():
        assert response.status_code == 200, (name, response.text)
        body = response.json()
        assert_prediction(body)
        assert body["digit"] == expected["digit"], name
        assert body["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-6), name


def test_pixels_are_fed_to_the_model_as_sent(client, model, digits):
    images, labels = digits
    for i in range(3):
        body = client.post("/api/predict", json={"pixels": images[i, 0].tolist()}).json()
        direct = predict_tensors(model, images[i : i + 1])[0]
        assert body["digit"] == direct["digit"] == labels[i].item()
        assert body["probabilities"] == pytest.approx(direct["probabilities"], abs=1e-6)


def test_include_image_returns_what_the_model_saw_and_top_k_is_honoured(client, digits):
    images, _ = digits
    data = user_png(images[1])
    body = client.post("/api/predict?include_image=true&top_k=5", files={"file": ("a.png", data, "image/png")}).json()
    assert_prediction(body, top_k=5)
    seen = torch.tensor(body["image"])
    assert seen.shape == (28, 28)
    assert torch.allclose(seen, preprocess(open_image(data))[0], atol=1e-4)
    assert "image" not in client.post("/api/predict", json={"pixels": images[1, 0].tolist()}).json()


def test_invert_option_reaches_preprocessing(client, digits):
    """invert=no on a dark-on-white picture: what preprocess(invert="no") gives, exactly (a 500 fails)."""
    from mnistrec.errors import ImageError

    images, _ = digits
    outcomes = set()
    for index in (1, 2):  # digit 1 still reads (differently) with invert=no; digit 2 has then "no ink"
        data = user_png(images[index])
        auto = client.post("/api/predict?invert=auto&include_image=true", content=data, headers={"content-type": "image/png"})
        forced = client.post("/api/predict?invert=no&include_image=true", content=data, headers={"content-type": "image/png"})
        assert auto.status_code == 200, auto.text
        try:
            expected = preprocess(open_image(data), invert="no")[0]
        except ImageError as exc:
            assert_error(forced, 422, str(exc))
            outcomes.add("422")
            continue
        assert forced.status_code == 200, forced.text
        assert torch.allclose(torch.tensor(forced.json()["image"]), expected, atol=1e-4)
        assert forced.json()["image"] != auto.json()["image"]
        outcomes.add("200")
    assert outcomes == {"200", "422"}  # both paths were exercised


# --------------------------------------------------------------------------- batch


def test_batch_of_files_keeps_going_past_a_bad_one(client, model, digits):
    images, _ = digits
    files = [("files", (f"d{i}.png", user_png(images[i]), "image/png")) for i in range(3)]
    files.insert(1, ("files", ("junk.png", b"not an image", "image/png")))
    response = client.post("/api/predict/batch", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["errors"] == 1 and len(body["predictions"]) == 4
    bad = body["predictions"][1]
    assert bad["filename"] == "junk.png" and "not an image" in bad["error"] and "digit" not in bad
    for item, i in zip([body["predictions"][k] for k in (0, 2, 3)], range(3)):
        assert item["digit"] == expected_for_file(model, user_png(images[i]))["digit"]
        assert item["filename"] == f"d{i}.png" and "error" not in item


def test_batch_json_forms_match_single_predictions(client, model, digits):
    images, labels = digits
    pixels = client.post("/api/predict/batch", json={"pixels": images[:8, 0].tolist()}).json()["predictions"]
    direct = predict_tensors(model, images[:8])
    assert [p["digit"] for p in pixels] == [d["digit"] for d in direct]
    assert sum(p["digit"] == y for p, y in zip(pixels, labels[:8].tolist())) >= 6
    encoded = [base64.b64encode(user_png(images[i])).decode() for i in range(2)]
    files = client.post("/api/predict/batch?top_k=2", json={"images": encoded}).json()["predictions"]
    assert [p["index"] for p in files] == [0, 1] and all(len(p["top_k"]) == 2 for p in files)


def test_batch_limit_and_empty_batch_are_422(client, digits):
    images, _ = digits
    assert_error(client.post("/api/predict/batch", json={"pixels": [images[0, 0].tolist()] * 9}),
                 422, "9 images", "limit of 8")
    assert_error(client.post("/api/predict/batch", json={"images": []}), 422, "at least 1 item")
    many = [("files", (f"{i}.png", b"x", "image/png")) for i in range(20)]
    assert_error(client.post("/api/predict/batch", files=many[:9]), 422, "limit of 8")
    assert client.post("/api/predict/batch", files=many).status_code in (400, 422)  # the form parser stops first


# --------------------------------------------------------------------------- limits and errors


def test_request_size_cap_is_413_with_and_without_content_length(client):
    big = b"\x89PNG" + b"0" * 1_100_000
    assert_error(client.post("/api/predict", content=big, headers={"content-type": "image/png"}), 413, "exceeds the limit")
    chunked = client.post("/api/predict", content=iter([big[:600_000], big[600_000:]]), headers={"content-type": "image/png"})
    assert_error(chunked, 413, "exceeds the limit")
    assert_error(client.post("/v2/models/mnistrec/infer", content=big, headers={"content-type": "application/json"}), 413)
    assert client.get("/api/health").status_code == 200  # the server is still fine


def test_pixel_cap_rejects_huge_images_before_decoding(client):
    buffer = io.BytesIO()
    Image.new("L", (1500, 1000), 255).save(buffer, "PNG", optimize=True)  # 1.5 Mpx in a few kB
    assert len(buffer.getvalue()) < 100_000
    response = client.post("/api/predict", content=buffer.getvalue(), headers={"content-type": "image/png"})
    assert_error(response, 422, "pixels")


@pytest.mark.parametrize("kwargs, status, words", [
    ({"content": b"garbage", "headers": {"content-type": "image/png"}}, 422, ["not an image"]),
    ({"content": b"", "headers": {"content-type": "image/png"}}, 422, ["empty"]),
    ({"files": {"file": ("a.png", b"\x89PNG\r\n\x1a\n\x00\x00", "image/png")}}, 422, []),
    ({"files": {"other": ("a.png", b"x", "image/png")}}, 422, ["'file'"]),
    ({"data": {"file": "just text"}}, 415, ["content type"]),
    ({"json": {"image": "@@@not base64@@@"}}, 422, ["base64"]),
    ({"json": {"image": ""}}, 422, ["empty"]),
    ({"json": {}}, 422, ["exactly one"]),
    ({"json": {"image": "aGk=", "pixels": [[0.0] * 28] * 28}}, 422, ["exactly one"]),
    ({"json": {"pixels": [[0.5] * 28] * 27}}, 422, ["pixels: list should have at least 28 items"]),
    ({"json": {"pixels": [[0.5] * 28] * 27 + [[0.5] * 5]}}, 422, ["pixels.27: list should have at least 28"]),
    ({"json": {"pixels": [[2.0] * 28] * 28}}, 422, ["less than or equal to 1"]),
    ({"json": {"pixels": "zeros"}}, 422, ["pixels"]),
    ({"json": {"pixel": []}}, 422, ["extra"]),
    ({"json": [1, 2, 3]}, 422, []),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, ["json"]),
    ({"content": b"NaN", "headers": {"content-type": "application/json"}}, 422, []),
    ({"content": b'{"pixels": [' + b",".join([b"[" + b",".join([b"NaN"] * 28) + b"]"] * 28) + b"]}",
      "headers": {"content-type": "application/json"}}, 422, []),
    ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, ["content type"]),
    ({"content": b"hello"}, 415, ["content type"]),
    ({"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 422, []),
])
def test_bad_single_inputs_get_a_clear_4xx(client, kwargs, status, words):
    assert_error(client.post("/api/predict", **kwargs), status, *words)


def test_blank_image_says_there_is_no_ink(client):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buffer, "PNG")
    assert_error(client.post("/api/predict", content=buffer.getvalue(), headers={"content-type": "image/png"}), 422, "no ink")


@pytest.mark.parametrize("query", ["top_k=0", "top_k=11", "top_k=two", "invert=maybe", "include_image=perhaps"])
def test_bad_query_parameters_are_422(client, query):
    assert_error(client.post(f"/api/predict?{query}", json={"pixels": [[0.0] * 28] * 28}), 422)


def test_unknown_routes_and_methods_are_json_4xx(client):
    assert_error(client.get("/api/nothing"), 404)
    assert_error(client.get("/api/predict"), 405)
    assert_error(client.post("/api/health"), 405)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/api/predict", "/api/predict/batch", "/v2/models/mnistrec/infer"]),
       content_type=st.sampled_from(["application/json", "image/png", "multipart/form-data; boundary=b",
                                     "application/octet-stream", "text/plain"]),
       body=st.one_of(st.binary(max_size=300),
                      st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
                                   lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                                       st.sampled_from(["image", "images", "pixels", "inputs", "name", "shape",
                                                        "datatype", "data", "outputs", "id"]), inner, max_size=4),
                                   max_leaves=20).map(lambda v: json.dumps(v).encode())))
def test_garbage_never_gets_a_500(client, path, content_type, body):
    response = client.post(path, content=body, headers={"content-type": content_type})
    assert 400 <= response.status_code < 500 or response.status_code == 200, (response.status_code, response.text)
    assert "detail" in response.json() or response.status_code == 200


# --------------------------------------------------------------------------- Open Inference Protocol v2


def test_v2_health_and_metadata(client):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2").json()["name"] == "mnistrec"
    meta = client.get("/v2/models/mnistrec").json()
    assert meta["inputs"][0]["shape"] == [-1, 1, 28, 28] and meta["inputs"][0]["datatype"] == "FP32"
    assert {o["name"] for o in meta["outputs"]} == {"probabilities", "digit", "confidence", "unsure"}
    assert client.get("/v2/models/mnistrec/ready").json() == {"name": "mnistrec", "ready": True}
    for route in ("/v2/models/other", "/v2/models/other/ready"):
        response = client.get(route)
        assert response.status_code == 404 and "other" in response.json()["error"]


@pytest.mark.parametrize("shape, datatype, scale, nested", [
    ([4, 1, 28, 28], "FP32", 1, True), ([4, 784], "FP32", 1, False), ([4, 28, 28], "FP64", 1, False),
    ([4, 784], "UINT8", 255, False),
])
def test_v2_infer_matches_the_model(client, model, digits, shape, datatype, scale, nested):
    images, _ = digits
    x = images[:4]
    values = (x * scale).round() if scale == 255 else x
    data = values.reshape(shape).tolist() if nested else values.flatten().tolist()
    response = client.post("/v2/models/mnistrec/infer", json={
        "id": "req-1", "inputs": [{"name": "input", "shape": shape, "datatype": datatype, "data": data}]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == "mnistrec" and body["id"] == "req-1"
    outputs = {o["name"]: o for o in body["outputs"]}
    direct = predict_tensors(model, (values / scale).float())
    assert outputs["probabilities"]["shape"] == [4, 10] and outputs["probabilities"]["datatype"] == "FP32"
    assert outputs["probabilities"]["data"] == pytest.approx([p for d in direct for p in d["probabilities"]], abs=1e-5)
    assert outputs["digit"] == {"name": "digit", "shape": [4], "datatype": "INT64", "data": [d["digit"] for d in direct]}


def test_v2_requested_outputs_only(client, digits):
    images, _ = digits
    body = client.post("/v2/models/mnistrec/infer", json={
        "inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32", "data": images[0].flatten().tolist()}],
        "outputs": [{"name": "digit"}]}).json()
    assert [o["name"] for o in body["outputs"]] == ["digit"]


@pytest.mark.parametrize("request_body, status, words", [
    ({"inputs": []}, 422, ["inputs"]),
    ({"inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32", "data": [0.0] * 783}]}, 422, ["784 values"]),
    ({"inputs": [{"name": "x", "shape": [1, 10], "datatype": "FP32", "data": [0.0] * 10}]}, 422, ["shape"]),
    ({"inputs": [{"name": "x", "shape": [784], "datatype": "FP32", "data": [0.0] * 784}]}, 422, ["shape", "at least 2"]),
    ({"inputs": [{"name": "x", "shape": [1, -784], "datatype": "FP32", "data": [0.0] * 784}]}, 422, ["shape"]),
    ({"inputs": [{"name": "x", "shape": [1, 784], "datatype": "BYTES", "data": ["a"] * 784}]}, 422, ["datatype"]),
    ({"inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32", "data": [3.0] * 784}]}, 422, ["between 0 and 1"]),
    ({"inputs": [{"name": "x", "shape": [1, 784], "datatype": "UINT8", "data": [300] * 784}]}, 422, ["255"]),
    ({"inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32", "data": ["a"] * 784}]}, 422, ["numbers"]),
    ({"inputs": [{"name": "x", "shape": [9, 784], "datatype": "FP32", "data": [0.0] * 9 * 784}]}, 422, ["limit of 8"]),
    ({"inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32", "data": [0.0] * 784}], "outputs": [{"name": "logits"}]},
     422, ["unknown output"]),
    ({"inputs": [{"name": "x", "shape": [1, 784]}]}, 422, ["datatype"]),
])
def test_v2_bad_requests_carry_the_protocol_error_field(client, request_body, status, words):
    response = client.post("/v2/models/mnistrec/infer", json=request_body)
    assert_error(response, status, *words)
    assert response.json()["error"] == response.json()["detail"]


# --------------------------------------------------------------------------- concurrency


def test_concurrent_requests_share_forward_passes_and_get_their_own_answers(mlp_checkpoint, model, digits):
    images, _ = digits
    app = create_app(mlp_checkpoint, batch_wait_ms=50)
    service = app.state.service

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            requests = [client.post("/api/predict", json={"pixels": images[i % 10, 0].tolist()}) for i in range(30)]
            return await asyncio.gather(*requests)

    try:
        responses = asyncio.run(main())
    finally:
        service.batcher.close()
    direct = predict_tensors(model, images)
    for i, response in enumerate(responses):
        assert response.status_code == 200
        assert response.json()["probabilities"] == pytest.approx(direct[i % 10]["probabilities"], abs=1e-5)
    assert service.batcher.items_run == 30
    assert service.batcher.batches_run < 15, "concurrent requests were not batched"


def test_a_slow_inference_does_not_block_the_event_loop(mlp_checkpoint, digits):
    """/api/health answers while a forward pass is running, proved by events: the forward pass has
    started (it says so) and cannot end (it waits for the test) until health has answered."""
    images, _ = digits
    app = create_app(mlp_checkpoint)
    batcher = app.state.service.batcher
    forward = batcher.fn
    started, release = threading.Event(), threading.Event()

    def slow_forward(x):  # a model that runs until the test lets it finish
        started.set()
        assert release.wait(120), "the test never released the forward pass"
        return forward(x)

    batcher.fn = slow_forward

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            slow = asyncio.create_task(client.post("/api/predict", json={"pixels": images[0, 0].tolist()}))
            assert await asyncio.to_thread(started.wait, 120), "the slow forward pass never started"
            health = await asyncio.wait_for(client.get("/api/health"), 60)  # a blocked loop would time out here
            assert not slow.done() and not release.is_set()  # the forward pass was in flight throughout
            release.set()
            return health, await slow

    try:
        health, slow = asyncio.run(main())
    finally:
        release.set()
        batcher.close()
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert slow.status_code == 200


def test_a_failing_forward_pass_is_reported_and_the_batcher_keeps_serving(mlp_checkpoint, digits):
    images, _ = digits
    app = create_app(mlp_checkpoint)
    batcher = app.state.service.batcher
    forward, calls = batcher.fn, []

    def flaky(x):
        calls.append(len(x))
        if len(calls) == 1:
            raise RuntimeError("simulated failure")
        return forward(x)

    batcher.fn = flaky
    with TestClient(app, raise_server_exceptions=False) as client:
        first = client.post("/api/predict", json={"pixels": images[0, 0].tolist()})
        second = client.post("/api/predict", json={"pixels": images[0, 0].tolist()})
    assert first.status_code == 500  # a bug in the model is a server error, not the user's
    assert second.status_code == 200 and len(calls) == 2


def test_serve_cli_refuses_a_missing_checkpoint_in_one_line(tmp_path):
    from conftest import run_cli

    result = run_cli("serve", tmp_path / "missing.pth", "--port", "1")
    assert result.returncode == 2
    assert result.stderr.startswith("mnistrec: error:") and "missing.pth" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


# --------------------------------------------------------------------------- small PNGs are preprocessed inline

def _png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size, 255).save(buffer, "PNG")
    return buffer.getvalue()


def test_only_small_pngs_are_preprocessed_on_the_event_loop():
    from mnistrec.serve.inputs import INLINE_PNG_PIXELS, is_small_png

    assert INLINE_PNG_PIXELS == 256 * 256
    assert is_small_png(_png((140, 140))) and is_small_png(_png((256, 256)))
    assert not is_small_png(_png((257, 256)))
    jpeg = io.BytesIO()
    Image.new("L", (20, 20), 255).save(jpeg, "JPEG")
    assert not is_small_png(jpeg.getvalue())  # other formats always go to the thread pool
    assert not is_small_png(_png((140, 140))[:20])  # too short to hold the header


def test_small_png_errors_on_the_inline_route_are_one_line_4xx(client, model, digits):
    png = user_png(digits[0][3])
    response = client.post("/api/predict", content=png, headers={"content-type": "image/png"})
    assert response.status_code == 200 and response.json()["digit"] == expected_for_file(model, png)["digit"]
    assert_error(client.post("/api/predict", content=png[: len(png) // 2], headers={"content-type": "image/png"}),
                 422, "truncated")
    assert_error(client.post("/api/predict", content=_png((140, 140)), headers={"content-type": "image/png"}),
                 422, "no ink")


def test_the_server_process_switches_the_gil_every_half_millisecond(app):
    # CPython's 5 ms default left the batcher thread waiting on the event loop (benchmarks/bench_serve_load.py).
    import sys

    from mnistrec.serve.service import GIL_SWITCH_SECONDS

    assert app.state.service is not None and sys.getswitchinterval() == pytest.approx(GIL_SWITCH_SECONDS) == 0.0005


def test_objects_alive_at_startup_are_frozen_for_the_servers_life(mlp_checkpoint):
    # Full garbage collections over torch's objects stalled a request now and then (~200 ms); the app freezes
    # what exists at startup and unfreezes on shutdown.
    import gc

    app = create_app(mlp_checkpoint)
    gc.unfreeze()  # process-wide: another app of this test session may have frozen objects already
    assert gc.get_freeze_count() == 0
    with TestClient(app) as c:
        assert gc.get_freeze_count() > 10_000  # torch, the model, FastAPI: far more than a bare interpreter
        assert c.get("/api/health").status_code == 200
    assert gc.get_freeze_count() == 0
