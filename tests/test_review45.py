"""review45: a review of guard43's settling, httpattack43's HTTP hardening, review43/44's hand-over paths,
leftovers43, walk43's refusals and attack43's storage checks, each finding shown with real parts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from locod.client import Client
from locod.daemon.config import load_config
from locod.errors import ConfigError

from .conftest import cloud_config, free_port, write_config
from .faultproxy import FaultProxy


def test_a_keyless_endpoint_is_sent_no_authorization_header(daemon_factory: Any, proxy: FaultProxy) -> None:
    """``needs_key = false`` says no key is read or sent (docs/configuration.md), yet every call carried
    ``Authorization: Bearer no-key-configured``, the placeholder the SDK needs to be built with: an endpoint that
    takes anonymous calls but checks any key it is given (a proxy with optional keys) refused each turn."""
    config = cloud_config(proxy.base_url, timeout_s=30.0)
    config["cloud"]["models"][0]["needs_key"] = False
    handle = daemon_factory(config)
    asked = handle.cli("ask", "Say hi.", "--max-tokens", "4", "-v")
    assert asked.returncode == 0 and "cloud-small" in asked.stderr, asked.stderr
    sent = proxy.chat_requests()
    assert sent and all("authorization" not in seen.headers for seen in sent), [s.headers for s in sent]


def test_an_ipv6_tcp_address_without_brackets_is_refused_by_the_config(tmp_path: Path) -> None:
    """walk43 holds daemon.tcp to tcp_host_port, which took ``tcp://::1:5557``: ZeroMQ binds an IPv6 address
    only on a socket told so, which ``ipv6`` tells only for ``tcp://[``, so the daemon loaded its model, then
    stopped saying another program may hold the port. Unbracketed, the address is ambiguous too (``::1:5557``
    is itself an IPv6 address); it is refused before anything is loaded, naming the bracketed form."""
    path = write_config(tmp_path / "config.toml", {"daemon": {"tcp": f"tcp://::1:{free_port()}"}})
    with pytest.raises(ConfigError) as refused:
        load_config(path, env={"LOCOD_RUNTIME_DIR": str(tmp_path / "run")})
    assert "daemon.tcp must look like tcp://127.0.0.1:5557" in refused.value.message
    assert "tcp://[::1]:5557" in refused.value.message


def test_a_client_refuses_an_ipv6_endpoint_without_brackets() -> None:
    """The same endpoint given to a Client: its probe connected over IPv6, ZeroMQ's socket (not told IPv6)
    never did, and a request waited out its timeout to be told the daemon might be stuck."""
    with pytest.raises(ConfigError) as refused:
        Client(f"tcp://::1:{free_port()}")
    assert refused.value.code == "bad_endpoint" and "tcp://[::1]:5557" in refused.value.message
