"""Keeping web pages off the HTTP door (docs/http.md, "Web pages").

On loopback without a key, any page the user opens in a browser could otherwise use the API: a ``fetch``
with a ``text/plain`` body is a CORS "simple" request that the browser sends without asking first, and a
page on a name that the attacker resolves to 127.0.0.1 (DNS rebinding) is same-origin with the API and
reads its answers. So POST bodies must be ``application/json`` (which a browser sends cross-origin only
after a preflight, which this server does not grant), and on a loopback address the ``Host`` and any
``Origin`` must name the machine itself. Beyond loopback the bearer key, which no page knows, is the guard.

The pages the user names in ``http.cors_origins`` (a chat UI that calls the API from the browser) are let
in: their ``Origin`` passes the gate, their preflight is answered, and their answers are marked readable.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from locod.daemon.config import LOOPBACK
from locod.daemon.openai_wire import HttpError
from locod.protocol import as_json

LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


class Gate:
    """The checks for one listen address; ``check`` raises an HttpError naming what it refused."""

    def __init__(self, listen_host: str, cors_origins: Collection[str] = ()) -> None:
        self.loopback = listen_host in LOOPBACK or listen_host.startswith("127.")
        self.names = LOCAL_NAMES | {listen_host.lower()}
        self.cors_origins = frozenset(cors_origins)

    def check(self, method: str, headers: Mapping[str, str]) -> None:
        if self.loopback:
            host = _hostname(headers.get("host", ""))
            if host not in self.names:
                raise HttpError(
                    403,
                    f"the Host header names {as_json(host) if host else 'nothing'}, not this machine: the API on a "
                    f"loopback address answers only requests for {', '.join(sorted(self.names))}",
                    "host_not_allowed",
                )
            origin = headers.get("origin")
            if origin is not None and origin not in self.cors_origins and urlsplit(origin).hostname not in self.names:
                raise HttpError(
                    403,
                    f"requests from web pages of {as_json(origin, 200)} are refused: name a page's origin in "
                    "http.cors_origins to let it call the API (docs/http.md, Web pages)",
                    "origin_not_allowed",
                    "origin",
                )
        if method == "POST":
            media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media != "application/json":
                raise HttpError(
                    415,
                    "the body must be sent as 'Content-Type: application/json', not "
                    + (as_json(media) if media else "without one"),
                    "unsupported_media_type",
                )


def _hostname(value: str) -> str:
    """``name``, ``name:port``, ``[v6]:port`` -> the name, lower case, without a trailing dot."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    name, _, port = value.rpartition(":")
    if name and port.isdigit():
        value = name
    return value.rstrip(".")


def cross_origin(app: ASGIApp, origins: Collection[str], exposed: str) -> ASGIApp:
    """``app`` with the CORS answers a browser needs before it lets a page of ``origins`` call the API: its
    preflight (``OPTIONS`` with ``Access-Control-Request-Method``) is granted for GET and POST with the
    headers it asks for (the bearer key, the SDKs' own), and each answer to it names that origin as its
    reader and ``exposed`` as headers it may read. Any other origin gets neither: the browser then withholds
    the answer, and on loopback the ``Gate`` refuses the request itself."""
    allowed = frozenset(origin.encode("latin-1") for origin in origins)

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"]) if scope["type"] == "http" else {}
        origin = headers.get(b"origin")
        if origin not in allowed:
            await app(scope, receive, send)
            return
        readable = [(b"access-control-allow-origin", origin), (b"vary", b"Origin")]
        if scope["method"] == "OPTIONS" and b"access-control-request-method" in headers:
            asked = headers.get(b"access-control-request-headers", b"authorization, content-type")
            granted = [
                (b"access-control-allow-methods", b"GET, POST"),
                (b"access-control-allow-headers", asked),
                (b"access-control-max-age", b"600"),
            ]
            await send({"type": "http.response.start", "status": 204, "headers": readable + granted})
            await send({"type": "http.response.body", "body": b""})
            return

        async def marked(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [*readable, (b"access-control-expose-headers", exposed.encode("latin-1"))]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await app(scope, receive, marked)

    return asgi
