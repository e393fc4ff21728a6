"""Hostile HTTP requests against a real uvicorn server on 127.0.0.1 (issue 16).

The server runs in this process (uvicorn.Server in a thread) so that a test can
hold a worker thread inside the JSON parser or the image decoder with an event,
and prove that ``/api/health`` answers meanwhile; a last test starts the real
``mnistrec serve`` CLI with ``--allowed-host``. No sleep synchronises anything:
"in flight" is always established by an event or by the protocol itself (a
request whose body has not been fully sent cannot have been answered).
"""

from __future__ import annotations

import http.client
import io
import json
import sys
import threading
import time

import httpx
import pytest
import uvicorn
from conftest import REPO, cli_env
from PIL import Image

from mnistrec.serve import service as service_module
from mnistrec.serve.app import DEFAULT_MAX_REQUEST_BYTES, create_app
from mnistrec.serve.hosts import default_allowed_hosts, host_name
from mnistrec.serve.service import decode_slots

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class LiveServer:
    """A uvicorn server on a free loopback port, serving ``app`` from a thread."""

    def __init__(self, app) -> None:
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:  # uvicorn sets this flag once it listens
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def raw(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)


@pytest.fixture(scope="module")
def live(mlp_checkpoint):
    app = create_app(mlp_checkpoint, allowed_hosts=default_allowed_hosts("127.0.0.1"))
    with LiveServer(app) as server:
        yield server


@pytest.fixture(scope="module")
def digits(mnist):
    return mnist.test_images[:64].float().div(255)


def v2_body(values: list[float], n: int) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "shape": [n, 784], "datatype": "FP32", "data": values}]}).encode()


def start_upload(conn: http.client.HTTPConnection, path: str, body_length: int, content_type: str = "application/json") -> None:
    conn.putrequest("POST", path)
    conn.putheader("Content-Type", content_type)
    conn.putheader("Content-Length", str(body_length))
    conn.endheaders()


# --------------------------------------------------------------------------- oversize bodies


def test_a_10_mib_v2_body_is_refused_while_health_answers(live):
    """10 MiB of JSON numbers (at the body limit, so it is read in full): health answers while it is in flight,
    then it gets a 422 from a count of its values, and is never handed to the JSON parser (which would make
    ~200 MB of objects of it)."""
    service = live.app.state.service
    values = b",".join([b"0.5"] * (DEFAULT_MAX_REQUEST_BYTES // 4))
    head, tail = b'{"inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32", "data": [', b"]}]}"
    body = head + values[: DEFAULT_MAX_REQUEST_BYTES - len(head) - len(tail)].rstrip(b",").rstrip(b"0.").rstrip(b",") + tail
    assert DEFAULT_MAX_REQUEST_BYTES - 8 <= len(body) <= DEFAULT_MAX_REQUEST_BYTES
    parsed = []
    parse = service.parse_json_bytes
    service.parse_json_bytes = lambda model, data: parsed.append(len(data)) or parse(model, data)
    conn = live.raw()
    try:
        start_upload(conn, "/v2/models/mnistrec/infer", len(body))
        conn.send(body[: len(body) // 2])
        # Half the body is sent: the upload cannot have been answered, yet health is.
        health = httpx.get(f"{live.url}/api/health", timeout=60)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        conn.send(body[len(body) // 2 :])
        response = conn.getresponse()
        detail = json.loads(response.read())
    finally:
        conn.close()
        service.parse_json_bytes = parse
    assert response.status == 422, detail
    assert "values" in detail["detail"] and "full batch of 64 images" in detail["detail"] and detail["error"] == detail["detail"]
    assert parsed == []  # refused before parsing
    # Over the body limit: 413 from Content-Length alone, before a byte of the body is read.
    conn = live.raw()
    try:
        start_upload(conn, "/v2/models/mnistrec/infer", DEFAULT_MAX_REQUEST_BYTES + 1)
        response = conn.getresponse()
        assert response.status == 413 and "exceeds the limit" in json.loads(response.read())["detail"]
    finally:
        conn.close()
    assert httpx.get(f"{live.url}/api/health", timeout=60).status_code == 200


def test_large_json_bodies_are_parsed_off_the_event_loop(live, digits):
    """A full batch of 64 real digits over v2 (~0.5 MB of JSON, above the inline-parse size): the parser is held
    inside a worker thread by an event, health answers meanwhile, then the request completes correctly."""
    service = live.app.state.service
    started, release = threading.Event(), threading.Event()
    parse = service.parse_json_bytes

    def held_parse(model, data):
        started.set()
        assert release.wait(120), "the test never released the parser"
        return parse(model, data)

    body = v2_body(digits.flatten().tolist(), 64)
    assert len(body) > service_module.INLINE_JSON_BYTES
    service.parse_json_bytes = held_parse
    result: dict = {}

    def upload() -> None:
        result["response"] = httpx.post(f"{live.url}/v2/models/mnistrec/infer", content=body,
                                        headers={"content-type": "application/json"}, timeout=120)

    sender = threading.Thread(target=upload)
    sender.start()
    try:
        assert started.wait(120), "the body was never parsed"
        health = httpx.get(f"{live.url}/api/health", timeout=60)  # the event loop is free while the parser works
        assert health.status_code == 200
        assert "response" not in result and not release.is_set()  # the big request was in the parser throughout
    finally:
        release.set()
        sender.join(120)
        service.parse_json_bytes = parse
    response = result["response"]
    assert response.status_code == 200, response.text
    digits_out = next(o for o in response.json()["outputs"] if o["name"] == "digit")["data"]
    assert len(digits_out) == 64


@pytest.mark.parametrize("path, payload, words", [
    ("/v2/models/mnistrec/infer", {"inputs": [{"name": "x" * 300, "shape": [1, 784], "datatype": "FP32", "data": [0.0] * 784}]},
     ["inputs.0.name", "at most 256"]),
    ("/api/predict/batch", {"images": ["aGk="] * 1025}, ["images: list should have at most 1024"]),
    ("/api/predict", {"pixels": [[0.0] * 29] * 28}, ["at most 28"]),
])
def test_schema_length_limits_are_422(live, path, payload, words):
    response = httpx.post(live.url + path, json=payload, timeout=60)
    assert response.status_code == 422, response.text
    for word in words:
        assert word.lower() in response.json()["detail"].lower(), response.text


# --------------------------------------------------------------------------- decode concurrency


def test_decode_slots_follow_the_memory_budget():
    mib = 1024 * 1024
    assert decode_slots(4096 * 4096, 512 * mib, cpus=8) == 6  # 64 MiB of pixels + 16 MiB of work each
    assert decode_slots(4096 * 4096, 512 * mib, cpus=2) == 2  # never more than the cores
    assert decode_slots(50_000_000, 512 * mib, cpus=8) == 2
    assert decode_slots(4096 * 4096, 10 * mib, cpus=8) == 1  # always at least one


def test_concurrent_decodes_wait_for_a_slot(mlp_checkpoint, monkeypatch):
    """With a budget for one decode, a second image waits in the limiter while the first is held in its decoder.

    The picture is bigger than INLINE_PNG_PIXELS: a small PNG (the page's canvas) is preprocessed on the event
    loop in about a millisecond and never queues for a decode slot.
    """
    from mnistrec.serve import api

    app = create_app(mlp_checkpoint, allowed_hosts=["127.0.0.1"], decode_memory_bytes=1)
    limiter = app.state.service.decode_limiter
    assert limiter.total_tokens == 1
    started, release, calls = threading.Event(), threading.Event(), []
    decode = api.image_to_tensor

    def held_decode(*args, **kwargs):
        calls.append(1)
        started.set()
        assert release.wait(120), "the test never released the decoder"
        return decode(*args, **kwargs)

    monkeypatch.setattr(api, "image_to_tensor", held_decode)
    from mnistrec.serve.inputs import INLINE_PNG_PIXELS, is_small_png

    page = Image.new("L", (320, 320), 255)
    page.paste(0, (100, 50, 200, 270))
    png = io.BytesIO()
    page.save(png, "PNG")
    assert 320 * 320 > INLINE_PNG_PIXELS and not is_small_png(png.getvalue())
    results: list[int] = []

    def post(server: LiveServer) -> None:
        results.append(httpx.post(f"{server.url}/api/predict", content=png.getvalue(),
                                  headers={"content-type": "image/png"}, timeout=120).status_code)

    with LiveServer(app) as server:
        first = threading.Thread(target=post, args=(server,))
        first.start()
        second = threading.Thread(target=post, args=(server,))
        try:
            assert started.wait(120), "the first image was never decoded"
            second.start()
            deadline = time.monotonic() + 120
            while limiter.statistics().tasks_waiting < 1:  # the second request has reached the limiter
                assert time.monotonic() < deadline, "the second request never reached the decode limiter"
                time.sleep(0.01)
            assert len(calls) == 1  # it waits for the slot instead of decoding beside the first
            assert httpx.get(f"{server.url}/api/health", timeout=60).status_code == 200
        finally:
            release.set()
            first.join(120)
            if second.ident is not None:  # started
                second.join(120)
    assert results == [200, 200] and len(calls) == 2


# --------------------------------------------------------------------------- Host header


@pytest.mark.parametrize("host, status", [
    ("evil.example", 400), ("evil.example:{port}", 400), ("127.0.0.1.evil.example", 400), ("", 400),
    ("127.0.0.1:{port}", 200), ("localhost:{port}", 200), ("LOCALHOST", 200), ("[::1]:{port}", 200),
])
def test_only_the_servers_own_host_names_are_answered(live, host, status):
    """DNS rebinding: a page on evil.example that resolves to 127.0.0.1 still sends Host: evil.example."""
    conn = live.raw()
    try:
        conn.putrequest("GET", "/api/model", skip_host=True)
        conn.putheader("Host", host.format(port=live.port))
        conn.endheaders()
        response = conn.getresponse()
        body = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == status, body
    if status == 400:
        assert "is not allowed" in body["detail"] and "--allowed-host" in body["detail"] and "architecture" not in body
    else:
        assert body["architecture"] == "mlp"


def test_host_names_are_parsed_like_a_browser_sends_them():
    assert host_name("[::1]:8000") == "[::1]" and host_name("Example.COM:80") == "example.com"
    assert host_name("localhost") == "localhost" and host_name("[::1]") == "[::1]"
    assert default_allowed_hosts("::1", ["Digits.Example", "fe80::2"])[-2:] == ["digits.example", "[fe80::2]"]
    assert default_allowed_hosts("0.0.0.0")[:4] == ["127.0.0.1", "localhost", "[::1]", "0.0.0.0"]


def test_serve_cli_allowed_host_option(mlp_checkpoint, tmp_path):
    """The real `mnistrec serve --allowed-host digits.example`: that name and the loopback names are answered,
    any other gets 400."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from soak_serve import running_server

    with running_server(mlp_checkpoint, tmp_path / "serve.log", env=cli_env(OMP_NUM_THREADS="1"), start_timeout=120,
                        args=["--allowed-host", "digits.example"]) as (url, _):
        statuses = {host: httpx.get(f"{url}/api/health", headers={"host": host}, timeout=60).status_code
                    for host in ("digits.example", "localhost", "evil.example")}
    assert statuses == {"digits.example": 200, "localhost": 200, "evil.example": 400}
    assert "Host names answered: 127.0.0.1, localhost, [::1], digits.example" in (tmp_path / "serve.log").read_text()


def test_the_uvicorn_factory_answers_only_loopback_names_unless_told(mlp_checkpoint, monkeypatch):
    """`uvicorn --factory mnistrec.serve.app:create_app_from_env` run by hand, without MNISTREC_SERVE_ALLOWED_HOSTS."""
    from fastapi.testclient import TestClient

    from mnistrec.serve.app import create_app_from_env

    monkeypatch.setenv("MNISTREC_SERVE_CHECKPOINT", str(mlp_checkpoint))
    monkeypatch.delenv("MNISTREC_SERVE_ALLOWED_HOSTS", raising=False)
    with TestClient(create_app_from_env(), base_url="http://evil.example") as client:
        assert client.get("/api/health").status_code == 400
        assert client.get("/api/health", headers={"host": "localhost:8000"}).status_code == 200
    monkeypatch.setenv("MNISTREC_SERVE_ALLOWED_HOSTS", "127.0.0.1,evil.example")
    with TestClient(create_app_from_env(), base_url="http://evil.example") as client:
        assert client.get("/api/health").status_code == 200
