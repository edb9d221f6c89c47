"""review45: a review of guard43's settling, httpattack43's HTTP hardening, review43/44's hand-over paths,
leftovers43, walk43's refusals and attack43's storage checks, each finding shown with real parts."""

from __future__ import annotations

from typing import Any

from .conftest import cloud_config
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
