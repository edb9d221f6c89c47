"""Attack 27: what landed in the twenty-sixth round (session turn order, `locod decisions` narrowing, the
breaker's early trial, the judge's cost hold, SIGHUP coalescing), on a real daemon and a real decision log.

A `decisions` request whose ``since`` was an integer past a double's range (a JSON number of 400 digits) was
answered ``internal`` without its id: the client waited out its timeout. A `--since` of hundreds of digits
went to the daemon as -Infinity and was refused in the protocol's words. The judge's hold, counted in the
tally of the day before, was taken off the next day's when its grading ended after midnight: today's spend
went below zero, and the daily cap let through more than the cap.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import zmq

from .conftest import DaemonHandle


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
