"""Corrections from the page (``mnistrec serve --collect DIR``, off by default): "Wrong? It was a _".

``POST /api/corrections`` with JSON ``{"image": base64 PNG, "digit": 0-9}`` saves
the drawing, as sent, to ``DIR/<digit>/<time>-<random>.png``: the server picks
the name, the client only picks a digit, so no request can name a path. The
file must be a PNG the model can read (it goes through ``preprocess`` first);
each is at most ``max_bytes`` and the folder at most ``max_files`` images (then
409). Nothing under ``DIR`` is ever served: there is no route that reads it.
``mnistrec finetune --images DIR`` then learns from it.

``GET /api/corrections`` says that collecting is on (the page shows the
correction buttons only then) and how many images are saved.
"""

from __future__ import annotations

import secrets
import threading
import time
from pathlib import Path

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..errors import MnistrecError
from ..fileio import atomic_write
from ..imagefile import open_image
from ..predict import IMAGE_EXTENSIONS
from ..preprocess import preprocess
from .inputs import InputError, decode_base64

#: Largest correction accepted: the page sends 140x140 PNGs of a few kB.
DEFAULT_MAX_BYTES = 256 * 1024
DEFAULT_MAX_FILES = 10_000
#: Largest picture (width x height) accepted as a correction.
MAX_PIXELS = 1024 * 1024


class Correction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str = Field(max_length=DEFAULT_MAX_BYTES * 4 // 3 + 100, description="base64 of a PNG (a data: URL is accepted)")
    digit: int = Field(ge=0, le=9, description="what the drawing really is")


class Saved(BaseModel):
    saved: str = Field(description="the file name the server chose, inside the folder of `digit`")
    digit: int
    count: int = Field(description="images in the collection now")


class Status(BaseModel):
    enabled: bool
    count: int
    max_files: int


class Collector:
    """Writes corrections into ``directory/<digit>/``; counts them so the cap holds across restarts."""

    def __init__(self, directory: str | Path, max_files: int = DEFAULT_MAX_FILES, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.directory = Path(directory)
        self.max_files, self.max_bytes = max_files, max_bytes
        try:
            for digit in range(10):
                (self.directory / str(digit)).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MnistrecError(f"--collect {self.directory}: cannot create it: {exc.strerror or exc}") from None
        self.count = sum(1 for d in range(10) for p in (self.directory / str(d)).iterdir()
                         if p.suffix.lower() in IMAGE_EXTENSIONS)
        self._lock = threading.Lock()

    def check(self, data: bytes) -> None:
        """Refuse (4xx) anything but a PNG of bounded size in which preprocessing finds a digit."""
        if len(data) > self.max_bytes:
            raise HTTPException(413, f"the correction is {len(data):,} bytes; at most {self.max_bytes:,} are accepted")
        if not data.startswith(b"\x89PNG\r\n\x1a\n"):
            raise InputError("a correction must be a PNG image")
        preprocess(open_image(data, max_pixels=MAX_PIXELS))  # raises ImageError (422) for junk or a blank drawing

    def save(self, data: bytes, digit: int) -> str:
        """Write ``data`` under a fresh server-chosen name in the digit's folder; returns the name."""
        with self._lock:
            if self.count >= self.max_files:
                raise HTTPException(409, f"the collection is full ({self.max_files:,} images); fine-tune on it and "
                                         "start a new folder")
            name = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(6)}.png"
            atomic_write(self.directory / str(digit) / name, lambda fh: fh.write(data))
            self.count += 1
            return name


def make_router(collector: Collector) -> APIRouter:
    """``GET`` and ``POST /api/corrections`` for ``collector``."""
    router = APIRouter(prefix="/api", tags=["corrections"])

    @router.get("/corrections", response_model=Status)
    async def status() -> Status:
        """Collecting is on (this route exists only with ``--collect``)."""
        return Status(enabled=True, count=collector.count, max_files=collector.max_files)

    @router.post("/corrections", response_model=Saved, status_code=201)
    async def correct(body: Correction) -> Saved:
        """Save a drawing the model got wrong, with the digit it really is."""
        data = decode_base64(body.image, "image")
        await run_in_threadpool(collector.check, data)
        name = await run_in_threadpool(collector.save, data, body.digit)
        return Saved(saved=name, digit=body.digit, count=collector.count)

    return router
