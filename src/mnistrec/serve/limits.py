"""Request-size limits, enforced before the app reads a body."""

from __future__ import annotations

from fastapi.responses import JSONResponse


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
