"""Keeping web pages off the HTTP door (docs/http.md, "Web pages").

On loopback without a key, any page the user opens in a browser could otherwise use the API: a ``fetch``
with a ``text/plain`` body is a CORS "simple" request that the browser sends without asking first, and a
page on a name that the attacker resolves to 127.0.0.1 (DNS rebinding) is same-origin with the API and
reads its answers. So POST bodies must be ``application/json`` (which a browser sends cross-origin only
after a preflight, which this server does not grant), and on a loopback address the ``Host`` and any
``Origin`` must name the machine itself. Beyond loopback the bearer key, which no page knows, is the guard.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

from locod.daemon.config import LOOPBACK
from locod.daemon.openai_wire import HttpError

LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


class Gate:
    """The checks for one listen address; ``check`` raises an HttpError naming what it refused."""

    def __init__(self, listen_host: str) -> None:
        self.loopback = listen_host in LOOPBACK or listen_host.startswith("127.")
        self.names = LOCAL_NAMES | {listen_host.lower()}

    def check(self, method: str, headers: Mapping[str, str]) -> None:
        if self.loopback:
            host = _hostname(headers.get("host", ""))
            if host not in self.names:
                raise HttpError(
                    403,
                    f"the Host header names {host or 'nothing'!r}, not this machine: the API on a loopback address "
                    f"answers only requests for {', '.join(sorted(self.names))}",
                    "host_not_allowed",
                )
            origin = headers.get("origin")
            if origin is not None and urlsplit(origin).hostname not in self.names:
                raise HttpError(
                    403, f"requests from web pages of {origin!r} are refused", "origin_not_allowed", "origin"
                )
        if method == "POST":
            media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media != "application/json":
                raise HttpError(
                    415,
                    f"the body must be sent as 'Content-Type: application/json', not {media or 'without one'!r}",
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
