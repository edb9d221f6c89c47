"""Which proxy the daemon's environment names for a cloud endpoint, read as curl reads it.

The cloud client has a transport of its own (daemon/bounded_http.py), which reads no proxy variable: without
this, a device behind a proxy never reached its cloud, and one meant to go through a proxy went around it.
The network probe (daemon/telemetry.py) times the same hop the requests take.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from locod.daemon.config import CloudModelConfig
from locod.errors import ConfigError


def proxy_for(model: CloudModelConfig, source: str, env: dict[str, str] | None = None) -> str | None:
    """The proxy the environment names for the model's endpoint (``https_proxy``, or ``http_proxy`` for an
    http URL, else ``all_proxy``; either case; ``no_proxy`` honoured); a proxy of a kind the transport
    cannot use (``socks5://``) is refused by the variable's name, never its value (it may hold a password),
    rather than gone around."""
    env = dict(os.environ) if env is None else env
    url = urlsplit(model.base_url)
    if _bypassed(url.hostname or "", env.get("no_proxy") or env.get("NO_PROXY") or ""):
        return None
    names = [f"{url.scheme}_proxy", f"{url.scheme.upper()}_PROXY", "all_proxy", "ALL_PROXY"]
    name = next((n for n in names if env.get(n)), None)
    if name is None:
        return None
    proxy = env[name].strip()
    if urlsplit(proxy).scheme not in ("http", "https"):
        raise ConfigError(
            f"{source}: cloud model {model.name!r}: ${name} names a proxy locod cannot use: only http:// and "
            f"https:// proxies are (or leave {url.hostname} out of it with $no_proxy)"
        )
    return proxy


@dataclass(frozen=True)
class Route:
    """How the model's requests reach its endpoint: the host and port they connect to (``hop``); when that is
    a proxy, its URL (``proxy``), and for an https endpoint behind an http proxy the host and port its
    requests ask the proxy for a tunnel to (``tunnel``: ``CONNECT``; an http endpoint's requests are forwarded
    by the proxy instead, and an https proxy is spoken to over TLS)."""

    hop: tuple[str, int]
    proxy: str | None = None
    tunnel: tuple[str, int] | None = None


def route(model: CloudModelConfig, source: str) -> Route | None:
    """How the model's requests go: to its endpoint, or through the proxy the environment names (a proxy the
    cloud refuses says so at the call: this goes direct); None for an endpoint that names no host."""
    through = None
    with contextlib.suppress(ConfigError):
        through = proxy_for(model, source)
    endpoint = _host_port(model.base_url)
    hop = _host_port(through) if through else endpoint
    if hop is None or endpoint is None:
        return None
    if through is None:
        return Route(hop)
    # an https proxy is spoken to in TLS first; schemes as urlsplit reads them, in lower case ("HTTP://" too)
    tunnelled = urlsplit(model.base_url).scheme == "https" and urlsplit(through).scheme == "http"
    return Route(hop, through, endpoint if tunnelled else None)


def first_hop(model: CloudModelConfig, source: str) -> tuple[str, int] | None:
    """The host and port the model's requests connect to: its endpoint, or the proxy they go through."""
    found = route(model, source)
    return None if found is None else found.hop


def _host_port(url: str) -> tuple[str, int] | None:
    parts = urlsplit(url)
    if not parts.hostname:
        return None
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def _bypassed(host: str, no_proxy: str) -> bool:
    """Whether ``no_proxy`` (hosts and domains, comma-separated; ``*`` for all) leaves ``host`` out, as curl
    reads it: ``example.com`` and ``.example.com`` both cover ``api.example.com``."""
    host = host.lower()
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if entry == "*":
            return True
        name = entry.rsplit(":", 1)[0] if entry.count(":") == 1 else entry  # host:port; IPv6 keeps its colons
        domain = name.strip("[]").lstrip(".")
        if domain and (host == domain or host.endswith("." + domain)):
            return True
    return False
