"""The web app and HTTP API: ``create_app(checkpoint) -> FastAPI``.

Routes
  ``/``                      the drawing page (static files, no CDN)
  ``POST /api/predict``      one image: multipart file, raw image body, or JSON (base64 ``image`` or 28x28 ``pixels``)
  ``POST /api/predict/batch`` several images, one result (or error) per image
  ``GET /api/health``, ``GET /api/model``
  ``/v2/...``                the Open Inference Protocol (KServe v2), see :mod:`mnistrec.serve.v2`
  ``/docs``, ``/openapi.json`` OpenAPI documentation, its JavaScript served locally

Every bad input is a 4xx JSON ``{"detail": "one line"}``. Image decoding runs in
the thread pool and inference in the micro-batcher's thread, so the event loop
only moves bytes.
"""

from __future__ import annotations

import hashlib
import os
import time
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import torch
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from .. import __version__
from ..backends import backend_for
from ..checkpoint import LoadedModel, load_checkpoint
from ..errors import ImageError, MnistrecError
from ..models import count_parameters, flops_per_image
from ..predict import predict_tensors
from .batcher import MicroBatcher
from .inputs import InputError, decode_base64, image_to_tensor, pixels_to_tensor, validation_message

STATIC_DIR = Path(__file__).parent / "static"

DEFAULT_MAX_REQUEST_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_BATCH_IMAGES = 64
IMAGE_CONTENT_TYPES = ("image/", "application/octet-stream")
# JSON bodies up to this size are parsed on the event loop: a hop to a worker thread costs more than the parse.
INLINE_JSON_BYTES = 64 * 1024

Invert = Literal["auto", "yes", "no"]


# --------------------------------------------------------------------------- schemas (also the OpenAPI document)


class Error(BaseModel):
    detail: str = Field(description="what was wrong, in one line")


class TopK(BaseModel):
    digit: int
    probability: float


class Prediction(BaseModel):
    """The schema of ``mnistrec predict --json`` (without ``path``)."""

    digit: int = Field(ge=0, le=9)
    confidence: float = Field(description="calibrated probability of `digit`")
    unsure: bool = Field(description="true when `confidence` is below the 'not sure' threshold (see docs/calibration.md)")
    probabilities: list[float] = Field(description="calibrated probability of each digit 0..9")
    top_k: list[TopK]
    image: list[list[float]] | None = Field(None, description="the 28x28 input the model saw, [0, 1], ink = 1 (with include_image=true)")


class BatchItem(BaseModel):
    """One image of a batch: a prediction, or ``error`` when that image could not be used."""

    index: int
    filename: str | None = None
    digit: int | None = None
    confidence: float | None = None
    unsure: bool | None = None
    probabilities: list[float] | None = None
    top_k: list[TopK] | None = None
    image: list[list[float]] | None = None
    error: str | None = None


class BatchResult(BaseModel):
    predictions: list[BatchItem]
    errors: int = Field(description="how many images could not be used")


# A 28x28 image as the model sees it; the schema says so, so clients and fuzzers know the shape and range.
Pixels = Annotated[list[Annotated[list[Annotated[float, Field(ge=0.0, le=1.0)]], Field(min_length=28, max_length=28)]],
                   Field(min_length=28, max_length=28)]


class PredictJSON(BaseModel):
    """Exactly one of ``image`` (a base64 image file) or ``pixels`` (28x28 model input)."""

    # Not nullable, and the schema's oneOf says "exactly one", so the OpenAPI document is as strict as the route.
    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [{"required": ["image"]}, {"required": ["pixels"]}]})
    image: str = Field(None, description="base64 of a PNG/JPEG/... file; a data: URL is accepted")
    pixels: Pixels = Field(None, description="28x28 floats in [0, 1], ink = 1, fed to the model as is")


class BatchJSON(BaseModel):
    """Exactly one of ``images`` (base64 image files) or ``pixels`` (N x 28 x 28 model input)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [{"required": ["images"]}, {"required": ["pixels"]}]})
    images: list[str] = Field(None, min_length=1, description="base64 image files")
    pixels: list[Pixels] = Field(None, min_length=1, description="N x 28 x 28 floats in [0, 1], ink = 1")


class PredictOptions:
    """The query options of the predict routes."""

    def __init__(
        self,
        top_k: int = Query(3, ge=1, le=10, description="how many of the likeliest digits to list"),
        invert: Invert = Query("auto", description="polarity of image files: auto-detect, or force"),
        include_image: bool = Query(False, description="also return the 28x28 image(s) the model saw"),
    ) -> None:
        self.top_k, self.invert, self.include_image = top_k, invert, include_image


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    uptime_seconds: float
    requests: int = Field(description="predictions served so far")
    forward_passes: int = Field(description="batched forward passes so far (fewer than requests under load)")


ERRORS = {code: {"model": Error, "description": text} for code, text in (
    (400, "malformed request"), (413, "request body too large"),
    (415, "unsupported content type"), (422, "content that cannot be used (not an image, no ink, bad shape, too many pixels or images)"),
)}


def _body_doc(json_model: type[BaseModel], multipart_field: str, many: bool, max_files: int = 1) -> dict[str, Any]:
    """OpenAPI request body for routes that read the body themselves (several content types)."""
    file_schema = {"type": "string", "format": "binary"}
    json_schema = json_model.model_json_schema()
    if many:  # the limit is the app's setting, so the document states it here
        for prop in json_schema["properties"].values():
            prop["maxItems"] = max_files
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "required": [multipart_field],
            "properties": {multipart_field: {"type": "array", "items": file_schema, "minItems": 1, "maxItems": max_files}
                           if many else file_schema},
        }},
        "application/json": {"schema": json_schema},
        **({} if many else {"image/png": {"schema": file_schema}, "image/jpeg": {"schema": file_schema},
                            "application/octet-stream": {"schema": file_schema}}),
    }}}


# --------------------------------------------------------------------------- limits and errors


class BodySizeLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets a JSON 413 before the app sees it.

    Starlette's own limit answers in plain text on some paths and lets a chunked
    body through to FastAPI's validation as an empty one (a 422), so we check
    ``Content-Length`` first, count chunked bodies as they arrive, and replay the
    (bounded) body to the app.
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and not length.isdigit():
            return await JSONResponse({"detail": "invalid Content-Length header"}, status_code=400)(scope, receive, send)
        if length is not None and int(length) > self.max_bytes:
            return await self._reject(scope, receive, send, f" of {int(length):,} bytes")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._reject(scope, receive, send, "")
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope, receive, send, size: str) -> None:
        response = JSONResponse({"detail": f"request body{size} exceeds the limit of {self.max_bytes:,} bytes"},
                                status_code=413, headers={"Connection": "close"})
        await response(scope, receive, send)


def _error(status: int, message: str, request: Request) -> JSONResponse:
    body = {"detail": message}
    if request.url.path.startswith("/v2"):
        body["error"] = message  # the Open Inference Protocol's error field
    return JSONResponse(body, status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MnistrecError)
    async def mnistrec_error(request: Request, exc: MnistrecError) -> JSONResponse:
        status = 422 if isinstance(exc, (ImageError, InputError)) else 400
        return _error(status, str(exc), request)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, validation_message(exc), request)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        response = _error(exc.status_code, str(exc.detail), request)
        response.headers.update(exc.headers or {})
        return response


# --------------------------------------------------------------------------- the service


class Service:
    """The loaded model, its batcher, and the request-independent facts about it."""

    def __init__(self, loaded: LoadedModel, checkpoint_path: Path, max_pixels: int, max_batch_images: int,
                 batch_wait_ms: float, model_name: str, backend: str = "torch") -> None:
        self.loaded = loaded
        self.model = loaded.model
        # What runs the predictions: the PyTorch model, or onnxruntime on this checkpoint exported in memory.
        # The checkpoint is read once (by the caller); the onnx backend exports these same weights in memory.
        # Both apply the checkpoint's temperature: every probability served is calibrated.
        self.runner = loaded.inference_model if backend == "torch" else backend_for(loaded, backend)
        self.name = model_name
        self.max_pixels = max_pixels
        self.max_batch_images = max_batch_images
        self.started = time.monotonic()
        # Decoding and preprocessing are CPU-bound: more threads than cores only add memory and contention.
        self.decode_limiter = anyio.CapacityLimiter(os.cpu_count() or 2)
        self.batcher = MicroBatcher(self._forward, max_batch=max(64, max_batch_images), max_wait_ms=batch_wait_ms)
        data = checkpoint_path.read_bytes()
        self.checkpoint = {"file": checkpoint_path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        self.parameters = count_parameters(self.model)
        self.flops = flops_per_image(self.model)

    def _forward(self, x: torch.Tensor) -> list[dict[str, Any]]:
        # top_k=10 once per batch; each request keeps the first k it asked for.
        with torch.inference_mode():
            return predict_tensors(self.runner, x, top_k=10)

    async def predict(self, x: torch.Tensor, top_k: int, include_image: bool) -> list[dict[str, Any]]:
        """Predictions for ``x`` [N,1,28,28] through the shared batcher."""
        results = await self.batcher.run(x)
        out = []
        for i, result in enumerate(results):
            result = {**result, "top_k": result["top_k"][:top_k]}
            if include_image:
                result["image"] = [[round(float(v), 4) for v in row] for row in x[i, 0].tolist()]
            out.append(result)
        return out

    async def decode(self, fn, *args):
        """Run ``fn(*args)`` in a worker thread, at most one per core at a time."""
        return await anyio.to_thread.run_sync(partial(fn, *args), limiter=self.decode_limiter)

    def check_batch(self, count: int) -> None:
        if count == 0:
            raise InputError("no images in the request")
        if count > self.max_batch_images:
            raise InputError(f"{count} images exceed the batch limit of {self.max_batch_images}")

    def describe(self) -> dict[str, Any]:
        meta = self.loaded.meta
        return {
            "name": self.name,
            "architecture": self.loaded.model_name,
            "model_kwargs": self.loaded.model_kwargs,
            "parameters": self.parameters,
            "flops_per_image": self.flops,
            "layers": repr(self.model),
            "recipe": meta.get("recipe"),
            "metrics": meta.get("metrics"),
            "calibration": meta.get("calibration"),
            "checkpoint": self.checkpoint,
            "versions": meta.get("versions"),
            "input": {"shape": [-1, 1, 28, 28], "dtype": "float32", "range": [0.0, 1.0], "ink": 1.0},
            "server": {"mnistrec": __version__, "max_batch_images": self.max_batch_images, "max_pixels": self.max_pixels},
        }


async def _read_sources(request: Request, many: bool, max_files: int) -> list[tuple[str | None, bytes | None, Any]]:
    """The images of a request as ``(filename, file bytes, pixels)`` triples (one of the last two set)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        field = "files" if many else "file"
        form = await request.form(max_files=max_files + 1, max_fields=max_files + 16)
        values = form.getlist(field) or form.getlist("file" if many else "files")
        if not values:
            raise InputError(f"multipart form has no {field!r} field")
        if not many and len(values) > 1:
            raise InputError("send one file to /api/predict; use /api/predict/batch for several")
        sources = []
        for value in values[: max_files + 1]:
            if isinstance(value, UploadFile):
                sources.append((value.filename, await value.read(), None))
            else:
                sources.append((None, value.encode(), None))
        return sources
    if content_type == "application/json":
        body = await request.body()
        model = BatchJSON if many else PredictJSON
        try:
            if len(body) <= INLINE_JSON_BYTES:
                parsed = model.model_validate_json(body)
            else:
                parsed = await run_in_threadpool(model.model_validate_json, body)
        except ValidationError as exc:
            raise InputError(validation_message(exc)) from None
        images = parsed.images if many else ([parsed.image] if parsed.image is not None else None)
        pixels = parsed.pixels if many else ([parsed.pixels] if parsed.pixels is not None else None)
        if (images is None) == (pixels is None):
            key = "images" if many else "image"
            raise InputError(f"send exactly one of {key!r} (base64 image) or 'pixels' (28x28 array)")
        if images is not None:
            return [(None, text, None) for text in images]
        return [(None, None, p) for p in pixels]
    if not many and content_type.startswith(IMAGE_CONTENT_TYPES):
        return [(None, await request.body(), None)]
    accepted = "multipart/form-data or application/json" + ("" if many else ", or an image/* body")
    raise HTTPException(415, f"unsupported content type {content_type or '(none)'!r}; send {accepted}")


def _to_tensor(source: tuple[str | None, Any, Any], service: Service, invert: str) -> torch.Tensor:
    """One source as ``[1, 28, 28]``: files and base64 are preprocessed, pixels are used as sent."""
    _, data, pixels = source
    if pixels is not None:
        x = pixels_to_tensor(pixels)
        if tuple(x.shape) != (28, 28):
            raise InputError(f"pixels has shape {list(x.shape)}; expected 28 rows of 28 numbers")
        return x.reshape(1, 28, 28)
    if isinstance(data, str):
        data = decode_base64(data)
    return image_to_tensor(data, service.max_pixels, invert)


def _decode_all(sources: list, service: Service, invert: str) -> list[torch.Tensor | str]:
    """Decode every source (in a worker thread); an unusable one becomes its error message."""
    out: list[torch.Tensor | str] = []
    for source in sources:
        try:
            out.append(_to_tensor(source, service, invert))
        except MnistrecError as exc:
            out.append(str(exc))
    return out


# --------------------------------------------------------------------------- the app


def create_app(checkpoint_path: str | os.PathLike, *, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS, max_batch_images: int = DEFAULT_MAX_BATCH_IMAGES,
               batch_wait_ms: float = 1.0, model_name: str = "mnistrec", backend: str = "torch") -> FastAPI:
    """Build the web app for one checkpoint (raises :class:`CheckpointError` if it cannot be loaded).

    ``max_request_bytes`` caps a request body (413), ``max_pixels`` an image's
    decoded size, ``max_batch_images`` the images per request; ``batch_wait_ms`` is
    how long the micro-batcher waits to group concurrent requests; ``backend``
    (``torch`` or ``onnx``) is the inference engine (see :mod:`mnistrec.backends`).
    """
    checkpoint_path = Path(checkpoint_path)
    service = Service(load_checkpoint(checkpoint_path), checkpoint_path, max_pixels, max_batch_images,
                      batch_wait_ms, model_name, backend)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.batcher.close()

    app = FastAPIOffline(
        title="mnistrec", version=__version__, lifespan=lifespan,
        description="Handwritten-digit recognition. Draw at `/`; predict with `/api/predict`; "
                    "KServe/Triton clients use the Open Inference Protocol under `/v2`.",
    )
    app.state.service = service
    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)
    _install_error_handlers(app)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        # The page loads nothing from elsewhere; the policy makes sure of it.
        csp = "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; connect-src 'self'"
        return FileResponse(STATIC_DIR / "index.html", headers={"Content-Security-Policy": csp})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.post("/api/predict", response_model=Prediction, response_model_exclude_none=True, responses=ERRORS,
              openapi_extra=_body_doc(PredictJSON, "file", many=False), tags=["predict"])
    async def predict(
        request: Request, options: PredictOptions = Depends()) -> dict[str, Any]:
        """Predict one digit: a multipart ``file``, an ``image/*`` body, or JSON ``{"image": base64}`` /
        ``{"pixels": 28x28 floats in [0, 1]}``. Returns the schema of ``mnistrec predict --json``."""
        sources = await _read_sources(request, many=False, max_files=1)
        if sources[0][2] is not None:  # 784 numbers: cheaper here than a thread hop
            x = _to_tensor(sources[0], service, options.invert)
        else:  # decoding and preprocessing an image file take milliseconds: off the event loop
            x = await service.decode(_to_tensor, sources[0], service, options.invert)
        return (await service.predict(x.unsqueeze(0), options.top_k, options.include_image))[0]

    @app.post("/api/predict/batch", response_model=BatchResult, response_model_exclude_none=True, responses=ERRORS,
              openapi_extra=_body_doc(BatchJSON, "files", many=True, max_files=max_batch_images), tags=["predict"])
    async def predict_batch(
        request: Request, options: PredictOptions = Depends()) -> dict[str, Any]:
        """Predict several images (multipart ``files``, or JSON ``images`` / ``pixels``), at most the batch limit.
        An image that cannot be used gets an ``error`` in its place; the others are still predicted."""
        sources = await _read_sources(request, many=True, max_files=service.max_batch_images)
        service.check_batch(len(sources))
        decoded = await service.decode(_decode_all, sources, service, options.invert)
        good = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
        images = torch.stack([decoded[i] for i in good]) if good else None
        results = await service.predict(images, options.top_k, options.include_image) if good else []
        items: list[dict[str, Any]] = [{"index": i, "filename": s[0]} for i, s in enumerate(sources)]
        for i, result in zip(good, results):
            items[i].update(result)
        for i, d in enumerate(decoded):
            if isinstance(d, str):
                items[i]["error"] = d
        return {"predictions": items, "errors": len(decoded) - len(good)}

    @app.get("/api/health", response_model=Health, tags=["service"])
    async def health() -> dict[str, Any]:
        """Liveness and counters."""
        return {"status": "ok", "model": service.name, "uptime_seconds": round(time.monotonic() - service.started, 3),
                "requests": service.batcher.items_run, "forward_passes": service.batcher.batches_run}

    @app.get("/api/model", tags=["service"])
    async def model_info() -> dict[str, Any]:
        """Architecture, parameter count, FLOPs, the checkpoint's test metrics and its SHA-256."""
        return service.describe()

    from .v2 import make_router

    app.include_router(make_router(service, ERRORS))
    return app


def create_app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` with several workers: settings come from ``MNISTREC_SERVE_*``."""
    env = os.environ
    return create_app(
        env["MNISTREC_SERVE_CHECKPOINT"],
        max_request_bytes=int(env.get("MNISTREC_SERVE_MAX_REQUEST_BYTES", DEFAULT_MAX_REQUEST_BYTES)),
        max_pixels=int(env.get("MNISTREC_SERVE_MAX_PIXELS", DEFAULT_MAX_PIXELS)),
        max_batch_images=int(env.get("MNISTREC_SERVE_MAX_BATCH", DEFAULT_MAX_BATCH_IMAGES)),
        model_name=env.get("MNISTREC_SERVE_MODEL_NAME", "mnistrec"),
        backend=env.get("MNISTREC_SERVE_BACKEND", "torch"),
    )
