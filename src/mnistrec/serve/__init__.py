"""The web app and HTTP API (FastAPI): ``create_app(checkpoint)``; run it with ``mnistrec serve``."""

from __future__ import annotations


def create_app(*args, **kwargs):
    """See :func:`mnistrec.serve.app.create_app` (imported lazily: FastAPI is an optional extra)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)
