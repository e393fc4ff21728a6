"""The ``Host`` header check: a defence against DNS rebinding.

A page on ``evil.example`` can make a victim's browser resolve ``evil.example``
to 127.0.0.1 and then read a server bound there, as the same origin. The
browser still sends ``Host: evil.example``, so a server that answers only the
host names it is really reached by cannot be read that way. Starlette's
``TrustedHostMiddleware`` splits the header at the first colon, which breaks
IPv6 literals (``[::1]:8000``), hence this small ASGI middleware.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from starlette.responses import JSONResponse

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def host_name(header: str) -> str:
    """The host of a ``Host`` header, lower case, without the port: ``[::1]:80`` -> ``[::1]``."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        return header[: end + 1] if end > 0 else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _as_host(name: str) -> str:
    """A name as it appears in a ``Host`` header: IPv6 literals in brackets."""
    name = name.strip().lower()
    try:
        if ipaddress.ip_address(name.strip("[]")).version == 6:
            return f"[{name.strip('[]')}]"
    except ValueError:
        pass
    return name


def default_allowed_hosts(bind: str, extra: Iterable[str] = ()) -> list[str]:
    """The host names a server bound to ``bind`` answers by default: the loopback names, the bound address
    itself, and ``extra`` (``--allowed-host``). ``*`` in ``extra`` accepts any host."""
    names = [*LOOPBACK_NAMES, _as_host(bind), *(_as_host(e) for e in extra)]
    return list(dict.fromkeys(n for n in names if n))


class TrustedHosts:
    """ASGI middleware: a request whose ``Host`` is not allowed gets a JSON 400 and never reaches the app.

    ``allowed`` holds host names (no port), ``*.example.com`` patterns, or ``*`` for any.
    """

    def __init__(self, app, allowed: Iterable[str]) -> None:
        self.app = app
        self.allowed = {_as_host(a) for a in allowed}
        self.any = "*" in self.allowed
        self.suffixes = tuple(a[1:] for a in self.allowed if a.startswith("*."))

    def accepts(self, host: str) -> bool:
        """Whether ``host`` (a header's host name, without port) is allowed."""
        return self.any or host in self.allowed or bool(self.suffixes and host.endswith(self.suffixes))

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or self.any:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = host_name(headers.get(b"host", b"").decode("latin-1"))
        if self.accepts(host):
            return await self.app(scope, receive, send)
        shown = host[:80] or "(none)"
        response = JSONResponse({"detail": f"Host header {shown!r} is not allowed by this server; "
                                           f"start it with --allowed-host {shown} to accept it"}, status_code=400)
        await response(scope, receive, send)
