"""Attack 27: what landed in the twenty-sixth round (session turn order, `locod decisions` narrowing, the
breaker's early trial, the judge's cost hold, SIGHUP coalescing), on a real daemon and a real decision log.

A `decisions` request whose ``since`` was an integer past a double's range (a JSON number of 400 digits) was
answered ``internal`` without its id: the client waited out its timeout. A `--since` of hundreds of digits
went to the daemon as -Infinity and was refused in the protocol's words. The judge's hold, counted in the
tally of the day before, was taken off the next day's when its grading ended after midnight: today's spend
went below zero, and the daily cap let through more than the cap. A `--session` not ASCII, typed in an
ASCII locale, was refused as lone surrogates. A call whose TCP connection was made and
whose TLS handshake then failed (a captive portal, a middlebox intercepting HTTPS) was taken for a network
gone: the probe, which only connects, let a call try at each of its rounds, each turn paying the failure.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from .conftest import SECRET, DaemonHandle, cloud_config, locod_command, wait_for


def test_a_decisions_since_past_a_doubles_range_is_refused_with_its_id(daemon: DaemonHandle) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.endpoint)
    try:
        head = json.dumps({"v": 1, "id": "narrow-1", "op": "decisions"})[:-1]
        sock.send(f'{head},"since":{"9" * 400}}}'.encode())
        assert sock.poll(60_000), "no reply"
        reply = json.loads(sock.recv())
    finally:
        sock.close()
    assert reply["id"] == "narrow-1", reply  # the old code said `internal` to no id: the client waited it out
    assert reply["code"] == "bad_field" and "since" in reply["message"], reply
    assert daemon.client().ping()["pong"]


def test_a_since_of_hundreds_of_digits_is_refused_as_a_period(daemon: DaemonHandle) -> None:
    result = daemon.cli("decisions", "--since", "9" * 400 + "w")
    assert result.returncode == 2, result  # the command line's error, before anything is asked
    assert "expects a period like 30m" in result.stderr and "finite Unix time" not in result.stderr, result.stderr


def test_a_non_ascii_session_is_continued_and_narrowed_to_in_an_ascii_locale(daemon: DaemonHandle) -> None:
    """`--session café` in LC_ALL=C (without UTF-8 mode) reached the daemon as lone surrogates, refused as "a
    lone UTF-16 surrogate escape": neither `ask` could continue that dialogue nor `decisions` narrow to it."""
    daemon.client().ask("Hi", session="café", max_tokens=2)
    env = {**daemon.env, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    for args in (["ask", "--session", "café", "--max-tokens", "2", "Hi"], ["decisions", "--session", "café", "--json"]):
        run = subprocess.run(locod_command("--config", str(daemon.config_path), *args), env=env, capture_output=True)
        assert run.returncode == 0, run.stderr.decode(errors="replace")
    assert [row["turn"] for row in json.loads(run.stdout)] == [1, 0]  # the session's two turns, newest first


def test_a_judges_hold_from_before_midnight_is_not_taken_off_the_next_days_spend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hold went to the day the grading began; its replacement, after midnight, took it off the new day's
    tally, which never had it: -0.049 USD spent today, and 0.049 USD more let past `cloud.daily_cap_usd`."""
    from locod.daemon.records import DecisionLog
    from locod.daemon.tallies import local_midnight

    clock: list[float] = [local_midnight() + 86400 - 1]  # 23:59:59 tonight
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: clock[0])
    log = DecisionLog(tmp_path / "locod.db")
    try:
        assert log.spent_today() == 0.0  # the day's tally, read as a turn's decision reads it
        hold = log.hold_cost(1, 0.05)  # the judge's call may cost 0.05 USD at most
        assert log.spent_today() == pytest.approx(0.05)
        clock[0] += 2  # the grading ends after midnight, having cost 0.001 USD
        assert log.spent_today() == 0.0  # a new day, read from the log
        log.add_cost(1, 0.001, hold)
        assert log.spent_today() == pytest.approx(0.001)  # the money the call spent; was -0.049
    finally:
        log.close()
        monkeypatch.setattr(time, "time", real_time)


class NotTls:
    """An endpoint on loopback that answers TLS with plain HTTP, as a captive portal intercepting port 443
    does: every connection is made, every handshake fails. ``accepted`` counts the connections."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: http://portal.example/login\r\n\r\n")


def test_a_breaker_opened_by_failed_tls_handshakes_keeps_its_cooldown_while_the_probe_connects(
    daemon_factory: Any,
) -> None:
    portal = NotTls()
    config = cloud_config(f"https://127.0.0.1:{portal.port}/v1", timeout_s=60.0, max_retries=0, breaker_failures=1)
    config["telemetry"] = {"probe_interval_s": 1.0}
    handle = daemon_factory(config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    client = handle.client(turn_timeout_s=300)
    try:
        cut_off = client.ask("What is the plural of mouse?", max_tokens=4)
        assert cut_off.done.outcome == "fallback" and client.status()["cloud"]["breaker"] == "open"
        after = portal.accepted
        # the third connection after the turn is a probe's begun after the one before it called back: at least
        # one probe began after the breaker opened and connected, and has said so to the breakers
        wait_for(lambda: portal.accepted >= after + 3, 120, "probes after the breaker opened")
        assert client.status()["cloud"]["breaker"] == "open"  # was closed: a trial each probe, each one failing
        assert "is reachable again" not in handle.log()
        again = client.ask("What is the plural of goose?", max_tokens=4)
        assert again.decision.location == "local", again.decision.reason  # not a call that fails as the last
    finally:
        portal.listener.close()
