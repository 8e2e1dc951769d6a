"""Who may reach the server's routes, checked before a body is read: with a token, every path but
the open ones needs `Authorization: Bearer <token>`; without one (loopback only), a request must
come to a loopback name with the bound port, and a POST must say it is JSON, so a web page cannot
drive the API from the user's browser.

Paths are compared as the app routes them (`route_path`: the path less the root path the app was
mounted or started under), and the open paths are listed rather than the protected ones: a path
that routes somewhere is never spelled in a way that skips the check.
"""

from __future__ import annotations

import hmac
import ipaddress

from gptcore.runtime.serve.requests import refusal

OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # what a load balancer or an orchestrator probes
# Methods a browser's page may send without asking first (CORS "simple requests") and that carry no body.
BODILESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def route_path(scope) -> str:
    """The path as the app's router matches it: `scope["path"]` less the `root_path` prefix it runs
    under (uvicorn's --root-path, or a mount inside a larger app), as Starlette computes it."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :] or "/"
    return path


def header(scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def bearer_matches(scope, token: bytes) -> bool:
    scheme, _, given = (header(scope, b"authorization") or b"").partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token)


def loopback_host(host: bytes | None, port: int | None) -> bool:
    """Whether a Host header names this machine's loopback with the bound `port` (a page whose own
    name was rebound to 127.0.0.1 sends its own name, and is refused)."""
    text = (host or b"").decode("latin-1").lower()
    if text.startswith("["):  # [::1]:8000
        name, _, rest = text[1:].partition("]")
        given = rest[1:] if rest.startswith(":") else None if not rest else "?"
    else:
        name, colon, given = text.partition(":")
        given = given if colon else None
    if port is not None and given not in ({None, "80"} if port == 80 else {str(port)}):
        return False
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_json(content_type: bytes | None) -> bool:
    return (content_type or b"").split(b";")[0].strip().lower() == b"application/json"


class AccessControl:
    """ASGI middleware: the bearer token on every path but OPEN_PATHS; without a token, the Host and
    content-type checks against browsers instead."""

    def __init__(self, app, token: str | None):
        self.app, self.token = app, token.encode() if token else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = route_path(scope)
        if self.token is not None:
            if path not in OPEN_PATHS and not bearer_matches(scope, self.token):
                message = "missing or wrong bearer token: send Authorization: Bearer <token>"
                answer = refusal(path, 401, message, {"WWW-Authenticate": "Bearer"})
                return await answer(scope, receive, send)
        else:
            server = scope.get("server")
            host = header(scope, b"host")
            if not loopback_host(host, server[1] if server else None):
                shown = (host or b"").decode("latin-1")[:100]
                message = (
                    f"Host header {shown!r}: this server has no token and answers only to localhost, "
                    "127.0.0.1 or [::1] with its port"
                )
                return await refusal(path, 400, message)(scope, receive, send)
            if scope["method"] not in BODILESS_METHODS and not is_json(header(scope, b"content-type")):
                message = "Content-Type: must be application/json"
                return await refusal(path, 415, message)(scope, receive, send)
        await self.app(scope, receive, send)
