"""Review 34 of the log throttles and the folder syncs: a throttled line must not hide another cause under
the same key, and a folder that cannot be synced must not turn a finished rename into a reported failure.
Real daemon, real model, the fault proxy as the cloud, the real `locod` command; lines counted, never timed."""

from __future__ import annotations

from typing import Any

from .conftest import SECRET, cloud_config
from .faultproxy import Fault, FaultProxy


def _lines(log: str, words: str) -> list[str]:
    return [line for line in log.splitlines() if words in line]


def test_a_refused_key_after_a_refused_request_is_logged(daemon_factory: Any) -> None:
    """Review finding: cloud fallbacks were throttled per model and error code, and every HTTP status is
    `cloud_http`: after a turn the endpoint refused 400 (a prompt too long, the request's fault), a revoked
    key's 401, with its "check the API key", was hidden for a minute (for good while such 400s kept coming).
    Now the status is part of the kind: the 401 is said at once."""
    proxy = FaultProxy("http://127.0.0.1:9").start()  # answers every call itself
    try:
        proxy.set(Fault("status", status=400))
        handle = daemon_factory(cloud_config(proxy.base_url), extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
        client = handle.client()
        assert client.ask("First?", max_tokens=2).done.outcome == "fallback"
        proxy.set(Fault("status", status=401))
        assert client.ask("Second?", max_tokens=2).done.outcome == "fallback"
    finally:
        proxy.stop()
    said = _lines(handle.log(), "falling back to the local model")
    assert len(said) == 2, said
    assert "HTTP 400" in said[0] and "HTTP 401" in said[1] and "check the API key" in said[1]


def test_a_config_broken_again_after_an_accepted_reload_is_logged(daemon_factory: Any) -> None:
    """Review finding: a rejected reload was throttled per message for a minute across accepted reloads:
    broken, fixed ("configuration reloaded"), then broken the same way again (SIGHUP, which no reply
    answers), and the log's last word was "reloaded" while the file on disk would not start the daemon.
    Now an accepted reload starts the throttle over."""
    handle = daemon_factory({})
    good = handle.config_path.read_text()
    client = handle.client()
    for text, reloaded in (("[routing]\nsla = 9\n", False), (good, True), ("[routing]\nsla = 9\n", False)):
        handle.config_path.write_text(text)
        assert client.reload()["reloaded"] is reloaded
    said = _lines(handle.log(), "reload rejected")
    assert len(said) == 2, said
    assert "got 9" in said[1]
