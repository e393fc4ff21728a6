"""The web app and HTTP API: ``create_app(checkpoint) -> FastAPI``, composed of one router per concern.

Routes
  ``/``                      the drawing page (static files, no CDN), see :mod:`mnistrec.serve.pages`
  ``POST /api/predict``      one image: multipart file, raw image body, or JSON (base64 ``image`` or 28x28 ``pixels``)
  ``POST /api/predict/batch`` several images, one result (or error) per image
  ``GET /api/health``, ``GET /api/model``   (all four: :mod:`mnistrec.serve.api`)
  ``/api/corrections``       with ``--collect DIR`` only: save a drawing the model got wrong (:mod:`mnistrec.serve.collect`)
  ``/v2/...``                the Open Inference Protocol (KServe v2), see :mod:`mnistrec.serve.v2`
  ``/docs``, ``/openapi.json`` OpenAPI documentation, its JavaScript served locally

Every bad input is a 4xx JSON ``{"detail": "one line"}`` (:mod:`mnistrec.serve.service`).
Image decoding runs in the thread pool (a small PNG such as the page's canvas: inline) and inference in the
micro-batcher's thread, so the event loop never waits on a big upload or on the model.
"""

from __future__ import annotations

import gc
import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Sequence

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from .. import __version__
from ..checkpoint import load_checkpoint
from . import api, v2
from .hosts import LOOPBACK_NAMES, TrustedHosts
from .limits import BodySizeLimit
from .pages import STATIC_DIR, add_pages
from .service import DEFAULT_DECODE_MEMORY_BYTES, ERRORS, Service, install_error_handlers

__all__ = ["DEFAULT_MAX_BATCH_IMAGES", "DEFAULT_MAX_PIXELS", "DEFAULT_MAX_REQUEST_BYTES", "STATIC_DIR", "Service",
           "create_app", "create_app_from_env"]

DEFAULT_MAX_REQUEST_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_BATCH_IMAGES = 64


def create_app(checkpoint_path: str | os.PathLike, *, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS, max_batch_images: int = DEFAULT_MAX_BATCH_IMAGES,
               batch_wait_ms: float = 0.0, model_name: str = "mnistrec", backend: str = "auto",
               allowed_hosts: Sequence[str] | None = None,
               decode_memory_bytes: int = DEFAULT_DECODE_MEMORY_BYTES, collect_dir: str | os.PathLike | None = None,
               collect_max_files: int | None = None) -> FastAPI:
    """Build the web app for one checkpoint (raises :class:`CheckpointError` if it cannot be loaded).

    ``max_request_bytes`` caps a request body (413), ``max_pixels`` an image's
    decoded size, ``max_batch_images`` the images per request; ``batch_wait_ms`` is
    how long the micro-batcher waits for more requests before a forward pass (0: none; requests that
    arrive during a forward pass still share the next); ``backend``
    (``auto``, ``torch`` or ``onnx``) is the inference engine (see :mod:`mnistrec.backends`).
    ``allowed_hosts`` are the ``Host`` header names answered (others get 400; ``None``
    answers any, for in-process use: ``mnistrec serve`` always passes its list, see
    :mod:`mnistrec.serve.hosts`); ``decode_memory_bytes`` bounds the memory of concurrent
    image decodes (:func:`mnistrec.serve.service.decode_slots`). ``collect_dir`` turns on
    corrections from the page, saved there (at most ``collect_max_files``; see :mod:`mnistrec.serve.collect`).
    """
    checkpoint_path = Path(checkpoint_path)
    service = Service(load_checkpoint(checkpoint_path), checkpoint_path, max_pixels, max_batch_images,
                      batch_wait_ms, model_name, backend, decode_memory_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Everything alive now (torch, the model, the routes) lives as long as the server: frozen, the garbage
        # collector's full passes skip it. Without this, one in a few thousand requests waited ~200 ms for a full
        # pass over torch's objects (the slowest of 16 clients' PNG requests: 190-250 ms, 75 ms frozen).
        gc.freeze()
        yield
        gc.unfreeze()  # an app run inside another program (tests) leaves its collector as it found it
        service.batcher.close()

    app = FastAPIOffline(
        title="mnistrec", version=__version__, lifespan=lifespan,
        description="Handwritten-digit recognition. Draw at `/`; predict with `/api/predict`; "
                    "KServe/Triton clients use the Open Inference Protocol under `/v2`.",
    )
    app.state.service = service
    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)
    if allowed_hosts is not None:  # added last, so it runs first: a foreign Host is refused before any body is read
        app.add_middleware(TrustedHosts, allowed=allowed_hosts)
    install_error_handlers(app)
    add_pages(app)
    app.include_router(api.make_router(service))
    app.include_router(v2.make_router(service, ERRORS))
    if collect_dir is not None:
        from .collect import DEFAULT_MAX_FILES, Collector, make_router

        app.include_router(make_router(Collector(collect_dir, collect_max_files or DEFAULT_MAX_FILES)))
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
        backend=env.get("MNISTREC_SERVE_BACKEND", "auto"),
        # Run directly under uvicorn without the variable, the server still answers only the loopback names.
        allowed_hosts=env.get("MNISTREC_SERVE_ALLOWED_HOSTS", ",".join(LOOPBACK_NAMES)).split(","),
        collect_dir=env.get("MNISTREC_SERVE_COLLECT") or None,
        collect_max_files=int(env["MNISTREC_SERVE_COLLECT_MAX"]) if "MNISTREC_SERVE_COLLECT_MAX" in env else None,
    )
