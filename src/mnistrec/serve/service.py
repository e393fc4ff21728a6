"""What every route shares: the loaded model (:class:`Service`) and the error schema.

:class:`Service` holds the model, the micro-batcher that runs it, the limits and
the facts about the checkpoint; the routers (:mod:`~mnistrec.serve.api`,
:mod:`~mnistrec.serve.v2`, :mod:`~mnistrec.serve.pages`) get it from
:func:`~mnistrec.serve.app.create_app`. Every bad input is a 4xx JSON
``{"detail": "one line"}`` (:data:`ERRORS`, :func:`install_error_handlers`).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import cv2
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException

from .. import __version__
from ..backends import backend_for, resolve_backend
from ..checkpoint import LoadedModel
from ..errors import ImageError, MnistrecError
from ..models import count_parameters, flops_per_image
from ..predict import predict_tensors
from .batcher import MicroBatcher
from .inputs import InputError, validation_message

#: The most images a request may ever carry (the pydantic models' static limit; ``--max-batch`` is at most this).
MAX_BATCH_LIMIT = 1024
#: JSON bodies up to this size are parsed on the event loop: a hop to a worker thread costs more than the parse.
INLINE_JSON_BYTES = 64 * 1024
#: CPython's GIL switch interval in a server process (its default is 5 ms); see Service.__init__.
GIL_SWITCH_SECONDS = 0.0005
#: Memory the concurrent image decodes may use together (each counted at its worst case, see decode_slots).
DEFAULT_DECODE_MEMORY_BYTES = 512 * 1024 * 1024
#: Worst-case float working memory of one preprocessing, beside the decoded pixels: a few float32 planes of
#: the 1024-px working size (mnistrec.imagefile.WORK_SIZE).
_WORK_BYTES = 4 * 1024 * 1024 * 4


def decode_slots(max_pixels: int, memory_bytes: int, cpus: int | None = None) -> int:
    """How many images may be decoded at once: one per core, and no more than ``memory_bytes`` allows when
    each decode is counted at its worst case (``max_pixels`` at 4 bytes each, plus the float work)."""
    per_decode = 4 * max_pixels + _WORK_BYTES
    return max(1, min(cpus or os.cpu_count() or 2, memory_bytes // per_decode))


def json_values_limit(max_batch_images: int) -> int:
    """The most JSON values (numbers, strings, ...) a request body may hold: every pixel of a full batch, plus slack."""
    return max_batch_images * 784 + 1024


class Error(BaseModel):
    detail: str = Field(description="what was wrong, in one line")


ERRORS = {code: {"model": Error, "description": text} for code, text in (
    (400, "malformed request"), (413, "request body too large"),
    (415, "unsupported content type"), (422, "content that cannot be used (not an image, no ink, bad shape, too many pixels or images)"),
)}


def error_response(status: int, message: str, request: Request) -> JSONResponse:
    """The error schema: ``{"detail": "one line"}`` (plus the protocol's ``error`` field under ``/v2``)."""
    body = {"detail": message}
    if request.url.path.startswith("/v2"):
        body["error"] = message  # the Open Inference Protocol's error field
    return JSONResponse(body, status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app raises becomes a JSON :func:`error_response`: user mistakes are 4xx, never 5xx."""
    @app.exception_handler(MnistrecError)
    async def mnistrecerror_response(request: Request, exc: MnistrecError) -> JSONResponse:
        status = 422 if isinstance(exc, (ImageError, InputError)) else 400
        return error_response(status, str(exc), request)

    @app.exception_handler(RequestValidationError)
    async def validationerror_response(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, validation_message(exc), request)

    @app.exception_handler(HTTPException)
    async def httperror_response(request: Request, exc: HTTPException) -> JSONResponse:
        response = error_response(exc.status_code, str(exc.detail), request)
        response.headers.update(exc.headers or {})
        return response


class Service:
    """The loaded model, its batcher, and the request-independent facts about it."""

    def __init__(self, loaded: LoadedModel, checkpoint_path: Path, max_pixels: int, max_batch_images: int,
                 batch_wait_ms: float, model_name: str, backend: str = "auto",
                 decode_memory_bytes: int = DEFAULT_DECODE_MEMORY_BYTES) -> None:
        self.loaded = loaded
        self.model = loaded.model
        # What runs the predictions: the PyTorch model, or onnxruntime on this checkpoint exported in memory.
        # The checkpoint is read once (by the caller); the onnx backend exports these same weights in memory.
        # Both apply the checkpoint's temperature: every probability served is calibrated.
        # auto: onnxruntime for the CNNs when installed, PyTorch for the MLP (mnistrec.backends).
        backend = resolve_backend(backend, loaded.model_name)
        self.runner = loaded.inference_model if backend == "torch" else backend_for(loaded, backend)
        self.backend = backend
        self.name = model_name
        self.max_pixels = max_pixels
        self.max_batch_images = max_batch_images
        self.started = time.monotonic()
        # Decoding and preprocessing are CPU-bound: more threads than cores only add memory and contention;
        # and a decode may hold 4 bytes per allowed pixel, so the memory budget can allow fewer still.
        self.decode_limiter = anyio.CapacityLimiter(decode_slots(max_pixels, decode_memory_bytes))
        # Requests already run one decode per core: OpenCV's own worker threads on a 140-px canvas only add
        # hand-offs (measured: ~0.5 ms CPU per PNG on 2 cores). Process-wide, as OpenCV offers no other scope.
        cv2.setNumThreads(1)
        # The event loop (HTTP, small PNGs) and the batcher thread (the model) hand the GIL to each other on every
        # request; at CPython's default 5 ms switch interval a waiting thread could sit idle for up to 5 ms. 0.5 ms
        # served 437-553 instead of 354-374 PNG requests/s at 16 clients (benchmarks/bench_serve_load.py, same
        # session). Process-wide, like the line above: the server process has no other work.
        sys.setswitchinterval(GIL_SWITCH_SECONDS)
        self.max_json_values = json_values_limit(max_batch_images)
        self.parse_json_bytes = _parse_json  # (model, body) -> parsed; runs in a worker thread for big bodies
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

    async def parse_json(self, model: type[BaseModel], body: bytes) -> BaseModel:
        """Validate a JSON body against ``model``, with bounded memory and without blocking the event loop.

        Parsing 10 MiB of JSON numbers takes ~200 MB and ~1 s whatever the model's
        length limits say (pydantic validates every item before it counts them), so a
        body holding more values than a full batch has (counted as commas, which
        base64 never contains) is refused first; a body over ``INLINE_JSON_BYTES`` is
        then parsed in a worker thread, within the decode limiter's memory budget.
        """
        values = body.count(b",") + 1
        if values > self.max_json_values:
            raise InputError(f"JSON body holds about {values:,} values, more than the {self.max_json_values:,} of a "
                             f"full batch of {self.max_batch_images} images")
        try:
            if len(body) <= INLINE_JSON_BYTES:
                return self.parse_json_bytes(model, body)
            return await self.decode(self.parse_json_bytes, model, body)
        except ValidationError as exc:
            raise InputError(validation_message(exc)) from None

    def check_batch(self, count: int) -> None:
        """Refuse an empty batch or one over the limit (422)."""
        if count == 0:
            raise InputError("no images in the request")
        if count > self.max_batch_images:
            raise InputError(f"{count} images exceed the batch limit of {self.max_batch_images}")

    def describe(self) -> dict[str, Any]:
        """What ``GET /api/model`` reports."""
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


def _parse_json(model: type[BaseModel], body: bytes) -> BaseModel:
    return model.model_validate_json(body)
