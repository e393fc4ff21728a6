"""The drawing page at ``/`` and its static files (no CDN: everything is served from here)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"


def add_pages(app: FastAPI) -> None:
    """Serve the page at ``/`` and its files under ``/static``."""
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        # The page loads nothing from elsewhere; the policy makes sure of it.
        csp = "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; connect-src 'self'"
        return FileResponse(STATIC_DIR / "index.html", headers={"Content-Security-Policy": csp})

    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
