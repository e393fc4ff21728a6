"""The ``/api`` routes: predict one image or a batch (multipart, raw image or JSON), health, model facts.

Image decoding runs in the thread pool (:meth:`Service.decode`), except for a
small PNG such as the page's canvas (about a millisecond of work, less than the
thread hop costs), and inference runs in the micro-batcher's thread. The schemas
here are also the OpenAPI document.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from ..errors import MnistrecError
from .inputs import InputError, decode_base64, image_to_tensor, is_small_png, pixels_to_tensor
from .service import ERRORS, MAX_BATCH_LIMIT, Service

IMAGE_CONTENT_TYPES = ("image/", "application/octet-stream")
#: Longest base64 image accepted in JSON: a 64 MiB file (the body limit, 10 MiB by default, is usually lower).
MAX_BASE64_CHARS = 64 * 1024 * 1024 * 4 // 3

Invert = Literal["auto", "yes", "no"]


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
    image: str = Field(None, max_length=MAX_BASE64_CHARS, description="base64 of a PNG/JPEG/... file; a data: URL is accepted")
    pixels: Pixels = Field(None, description="28x28 floats in [0, 1], ink = 1, fed to the model as is")


class BatchJSON(BaseModel):
    """Exactly one of ``images`` (base64 image files) or ``pixels`` (N x 28 x 28 model input)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [{"required": ["images"]}, {"required": ["pixels"]}]})
    images: list[Annotated[str, Field(max_length=MAX_BASE64_CHARS)]] = Field(
        None, min_length=1, max_length=MAX_BATCH_LIMIT, description="base64 image files")
    pixels: list[Pixels] = Field(None, min_length=1, max_length=MAX_BATCH_LIMIT,
                                 description="N x 28 x 28 floats in [0, 1], ink = 1")


@dataclass(frozen=True)
class PredictOptions:
    """The query options of the predict routes."""

    top_k: int
    invert: Invert
    include_image: bool


async def predict_options(
    top_k: int = Query(3, ge=1, le=10, description="how many of the likeliest digits to list"),
    invert: Invert = Query("auto", description="polarity of image files: auto-detect, or force"),
    include_image: bool = Query(False, description="also return the 28x28 image(s) the model saw"),
) -> PredictOptions:
    # async on purpose: FastAPI runs a plain (sync) dependency in its thread pool, a thread hop per request
    # that cost more server CPU than parsing a 28x28 pixels body (benchmarks/bench_serve_load.py).
    return PredictOptions(top_k, invert, include_image)


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    uptime_seconds: float
    requests: int = Field(description="predictions served so far")
    forward_passes: int = Field(description="batched forward passes so far (fewer than requests under load)")


def body_doc(json_model: type[BaseModel], multipart_field: str, many: bool, max_files: int = 1) -> dict[str, Any]:
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


async def _read_sources(request: Request, service: Service, many: bool, max_files: int) -> list[tuple[str | None, bytes | None, Any]]:
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
        parsed = await service.parse_json(BatchJSON if many else PredictJSON, await request.body())
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


def make_router(service: Service) -> APIRouter:
    """The ``/api`` routes for ``service``."""
    router = APIRouter()

    @router.post("/api/predict", response_model=Prediction, response_model_exclude_none=True, responses=ERRORS,
              openapi_extra=body_doc(PredictJSON, "file", many=False), tags=["predict"])
    async def predict(
        request: Request, options: PredictOptions = Depends(predict_options)) -> dict[str, Any]:
        """Predict one digit: a multipart ``file``, an ``image/*`` body, or JSON ``{"image": base64}`` /
        ``{"pixels": 28x28 floats in [0, 1]}``. Returns the schema of ``mnistrec predict --json``."""
        sources = await _read_sources(request, service, many=False, max_files=1)
        _, data, pixels = sources[0]
        if pixels is not None or isinstance(data, bytes) and is_small_png(data):  # cheaper here than a thread hop
            x = _to_tensor(sources[0], service, options.invert)
        else:  # a bigger image takes milliseconds to decode and preprocess: off the event loop
            x = await service.decode(_to_tensor, sources[0], service, options.invert)
        return (await service.predict(x.unsqueeze(0), options.top_k, options.include_image))[0]

    @router.post("/api/predict/batch", response_model=BatchResult, response_model_exclude_none=True, responses=ERRORS,
              openapi_extra=body_doc(BatchJSON, "files", many=True, max_files=service.max_batch_images), tags=["predict"])
    async def predict_batch(
        request: Request, options: PredictOptions = Depends(predict_options)) -> dict[str, Any]:
        """Predict several images (multipart ``files``, or JSON ``images`` / ``pixels``), at most the batch limit.
        An image that cannot be used gets an ``error`` in its place; the others are still predicted."""
        sources = await _read_sources(request, service, many=True, max_files=service.max_batch_images)
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

    @router.get("/api/health", response_model=Health, tags=["service"])
    async def health() -> dict[str, Any]:
        """Liveness and counters."""
        return {"status": "ok", "model": service.name, "uptime_seconds": round(time.monotonic() - service.started, 3),
                "requests": service.batcher.items_run, "forward_passes": service.batcher.batches_run}

    @router.get("/api/model", tags=["service"])
    async def model_info() -> dict[str, Any]:
        """Architecture, parameter count, FLOPs, the checkpoint's test metrics and its SHA-256."""
        return service.describe()

    return router
