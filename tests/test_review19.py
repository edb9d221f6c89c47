"""Review 19: the session's last merges (walk 18, attack 18) read as their maintainer. Each test is an edge
the new code got wrong."""

from __future__ import annotations

from typing import Any

from .conftest import SECRET, cloud_config, write_config

DEAD_URL = "http://127.0.0.1:1/v1"  # nothing listens on port 1: every connection is refused at once
GONE_URL = "http://127.0.0.1:2/v1"  # the endpoint the reload removes (never called)


def test_status_counts_no_breaker_of_an_endpoint_a_reload_removed(daemon_factory: Any) -> None:
    """A reload keeps a removed endpoint's breaker (a turn still talking to it counts its failures there),
    and status and /metrics listed it among the daemon's endpoints: with the one endpoint left down, status
    read "breaker open for http://127.0.0.1:1/v1 (the other is closed)", an other there was not. Now they
    show the configured endpoints' breakers only."""
    config = cloud_config(DEAD_URL, mode="auto", breaker_failures=1, max_retries=0)
    gone = {**config["cloud"]["models"][0], "name": "cloud-gone", "base_url": GONE_URL}
    config["cloud"]["models"].append(gone)
    handle = daemon_factory(config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    client = handle.client()
    assert set(client.status()["cloud"]["breakers"]) == {DEAD_URL, GONE_URL}

    config["cloud"]["models"].pop()
    write_config(handle.config_path, config)
    assert client.reload()["reloaded"]
    turn = client.ask("Name a colour.", max_tokens=4, model="cloud-small")
    assert turn.done.location == "local"  # the endpoint refused it: the local model answered
    cloud = client.status()["cloud"]
    assert cloud["breakers"] == {DEAD_URL: "open"} and cloud["breaker"] == "open"
    out = handle.cli("status").stdout
    assert "breaker open;" in out and "the other is closed" not in out, out
