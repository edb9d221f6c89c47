"""Time as an input: time zones, DST days of 23 and 25 hours, and a cloud server whose clock is not this
machine's (a Jetson without an RTC boots in 1970 or 2000 and runs so until NTP sets it). Each test is one
way in that broke, and now holds."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from locod.daemon.history import daily_cost, parse_since, read_history
from locod.daemon.records import DecisionLog, DecisionRecord, Outcome
from locod.daemon.tallies import local_midnight
from locod.policy.messplus import MessPlus
from locod.protocol import RecordQuery

from .conftest import SECRET, cloud_config
from .faultproxy import Fault, FaultProxy

DAY = 86400.0


def local(year: int, month: int, day: int, hour: int, minute: int = 0) -> float:
    """The Unix time of a local wall-clock time, in the zone set now."""
    return time.mktime((year, month, day, hour, minute, 0, 0, 0, -1))


def write_turns(db: Path, times: list[float]) -> None:
    """Cloud turns through the real records code, each dated ``times[i]`` (begun, and ended a second on)."""
    log = DecisionLog(db)
    for when in times:
        decision = log.begin(DecisionRecord("s", 0, "r", "0" * 64, 5, None, "chat", "cloud", "cloud", "test"))
        log.finish(decision, Outcome("ok", "cloud", "cloud", cost_usd=0.01))
        log.db.execute("UPDATE decisions SET created = ?, finished = ? WHERE id = ?", [when, when + 1, decision])
    log.close()


@pytest.mark.parametrize(
    ("name", "changed"),
    [
        ("America/New_York", (2026, 11, 1)),  # DST ends: a day of 25 hours
        ("America/New_York", (2026, 3, 8)),  # DST starts: a day of 23 hours
        ("Europe/Berlin", (2026, 10, 25)),
        ("America/Sao_Paulo", (2018, 11, 4)),  # DST began at midnight: that day began at 01:00
    ],
)
def test_the_reports_days_are_local_days_across_a_dst_change(
    zone: Callable[[str], None], tmp_path: Path, name: str, changed: tuple[int, int, int]
) -> None:
    """`locod report` over a week or more draws a bar a day. The days were counted as 86,400 s from the
    first midnight, so after the 25-hour day each began at 23:00: the day of the change was drawn twice
    (23:00 of it began the next bar, labelled with its date), and every later bar held a day's turns but
    the last hour's of the day before. Now each bar is a local day, from its first second to the next day's."""
    zone(name)
    year, month, day = changed
    dates = [time.localtime(local(year, month, day + offset, 12)) for offset in range(-4, 5)]
    turns = [local(*d[:3], hour, minute) for d in dates for hour, minute in ((0, 30), (23, 30))]
    write_turns(tmp_path / "locod.db", turns)
    now = local(*dates[-1][:3], 23, 45)
    history = read_history(tmp_path / "locod.db", parse_since("10d"), now=now)
    assert history.bucket_s == DAY
    starts = [time.localtime(b.start) for b in history.buckets]
    first_seconds = [time.localtime(b.start - 1)[:3] != s[:3] for s, b in zip(starts, history.buckets)]
    assert all(first_seconds), [time.strftime("%m-%d %H:%M", s) for s in starts]  # each begins its local day
    by_day = {time.strftime("%Y-%m-%d", s): b.turns for s, b in zip(starts, history.buckets)}
    assert len(by_day) == len(history.buckets)  # no day drawn twice
    assert by_day == Counter(time.strftime("%Y-%m-%d", time.localtime(t)) for t in turns)


def test_the_reports_hours_begin_on_the_local_hour_in_a_half_hour_zone(
    zone: Callable[[str], None], tmp_path: Path
) -> None:
    """India is UTC+5:30: hours counted on UTC's grid began at :30 on the user's clock, and a turn at 10:45
    was drawn in the bar labelled 10:30. Now an hour's bar is the local hour."""
    zone("Asia/Kolkata")
    turns = [local(2026, 11, 20, 10, 45), local(2026, 11, 20, 11, 15)]
    write_turns(tmp_path / "locod.db", turns)
    history = read_history(tmp_path / "locod.db", parse_since("2d"), now=local(2026, 11, 21, 9, 0))
    assert history.bucket_s == 3600
    assert {time.localtime(b.start).tm_min for b in history.buckets} == {0}
    drawn = {time.strftime("%d %H:%M", time.localtime(b.start)): b.turns for b in history.buckets if b.turns}
    assert drawn == {"20 10:00": 1, "20 11:00": 1}


def test_the_caps_day_follows_a_zone_changed_under_the_running_daemon(
    zone: Callable[[str], None], tmp_path: Path
) -> None:
    """A traveller's machine changes zone under the running daemon (``timedatectl set-timezone``: the next
    mktime reads it, as a changed TZ is read here). Today's spend, read for the old zone's day, was kept
    until that zone's midnight: after a flight east, a day more of the old zone's day against the cap, while
    `locod report`, run in the new zone, counted the new one's. Now the next read is the new zone's day."""
    zone("Asia/Tokyo")
    now = time.time()
    turns = [now - 60 - hour * 3600 for hour in range(48)]  # a cent an hour for two days
    write_turns(tmp_path / "locod.db", turns)
    log = DecisionLog(tmp_path / "locod.db")
    try:
        assert log.spent_today() == pytest.approx(0.01 * sum(t >= local_midnight() for t in turns))
        os.environ["TZ"] = "America/Los_Angeles"  # the machine's zone now; this process not told (no tzset)
        spent = log.spent_today()
        time.tzset()  # the expected day, in the new zone
        assert spent == pytest.approx(0.01 * sum(t >= local_midnight() for t in turns))  # 7 or 17 h apart
    finally:
        log.close()


def test_the_daemons_day_is_its_zones_and_the_report_in_that_zone_agrees(
    zone: Callable[[str], None], daemon_factory: Any
) -> None:
    """The same log, read by a daemon in Kiritimati (UTC+14) and by one in Pago Pago (UTC-11), a day apart on
    the calendar: each counts today's spend from its own local midnight, and `locod report`'s money per day,
    drawn in the same zone, says the same."""
    handle = daemon_factory()
    assert handle.client().ask("Say hi.", max_tokens=2).done is not None
    handle.stop()
    now = time.time()
    turns = [now - 60 - hour * 3600 for hour in range(48)]  # a cent an hour for two days
    write_turns(handle.db_path, turns)
    spent_in: dict[str, float] = {}
    for name in ("Pacific/Kiritimati", "Pacific/Pago_Pago"):
        zone(name)
        today = [t for t in turns if t >= local_midnight()]
        daemon = daemon_factory(extra_env={"TZ": name})
        spent = spent_in[name] = daemon.client().status()["cloud"]["spent_today_usd"]
        daemon.stop()
        assert spent == pytest.approx(0.01 * len(today)), name
        assert daily_cost(read_history(handle.db_path, 2 * DAY))[time.strftime("%Y-%m-%d")] == pytest.approx(spent)
    assert len(set(spent_in.values())) == 2  # midnights 1 or 23 hours apart: a turn an hour between them


def test_a_turn_a_restart_finds_unfinished_is_not_dated_before_it_began(tmp_path: Path) -> None:
    """A start marks the turns a dead daemon left running as interrupted, finished now, their most kept as
    spent. A Jetson without an RTC that crashed mid-turn restarts in 1970 (or 2000): its turn of today was
    dated finished then, decades before it began, and its most spent on that day, never today's once NTP set
    the clock. Now such a turn is finished when it began (here: begun on a clock a month ahead of this one)."""
    log = DecisionLog(tmp_path / "locod.db")
    record = DecisionRecord("s", 0, "r", "0" * 64, 5, None, "chat", "cloud", "cloud", "test", cost_usd=0.2)
    decision = log.begin(record)
    begun = time.time() + 30 * DAY
    log.db.execute("UPDATE decisions SET created = ? WHERE id = ?", [begun, decision])
    log.close()
    restarted = DecisionLog(tmp_path / "locod.db")
    try:
        (row,) = restarted.recent(RecordQuery(limit=1))
        assert (row["outcome"], row["cost_usd"]) == ("interrupted", 0.2)
        assert row["finished"] == row["created"] == begun
    finally:
        restarted.close()


def test_a_damaged_router_state_set_aside_never_replaces_one_set_aside_before(tmp_path: Path) -> None:
    """A damaged MESS+ state is set aside as ``messplus.npz.bad-<second>``, named by the wall clock alone. A
    Jetson without an RTC starts at the same second of 1970 at every boot (and any clock set back repeats a
    second): the next damaged state replaced the one set aside before, and that damage was lost unseen. Now
    each is kept under a name of its own."""
    path = tmp_path / "messplus.npz"
    now = int(time.time())
    earlier = {path.with_name(f"{path.name}.bad-{s}"): f"earlier {s}" for s in range(now - 2, now + 120)}
    for file, text in earlier.items():
        file.write_text(text)
    path.write_bytes(b"not a state")
    router = MessPlus({"local": 0.5}, sla=0.8, v=1.0, explore_c=0.0, q_cap=10.0, path=path)
    assert router.state.t == 0  # started from the prior
    assert all(file.read_text() == text for file, text in earlier.items())
    (kept,) = set(tmp_path.glob("messplus.npz.bad-*")) - set(earlier)
    assert kept.read_bytes() == b"not a state"


def retrying_cloud(daemon_factory: Any, proxy: FaultProxy) -> Any:
    """A daemon whose every turn goes to the loopback cloud behind the fault proxy, retrying a 429 whose
    Retry-After asks for 2 s or less (cloud_config), its breaker never opened within the test."""
    config = cloud_config(proxy.base_url, timeout_s=30.0, breaker_failures=100)
    return daemon_factory(config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})


def test_a_retry_after_date_is_read_on_the_servers_clock(daemon_factory: Any, proxy: FaultProxy) -> None:
    """A 429's Retry-After as an HTTP date was counted from this machine's clock. Decades behind the server
    (a Jetson in 1970 before NTP), "in one second" read as decades: not retried, the turn fell back; ahead of
    it, "in an hour" read as no wait at all: retried at once, every retry, against the server's ask. Now the
    date is counted from the answer's own Date: the server's clock, whatever this one says."""
    handle = retrying_cloud(daemon_factory, proxy)
    client = handle.client()
    ahead = "Sat, 01 Jan 2050 00:00:00 GMT"  # the server's clock, 24 years ahead of this one
    proxy.set(Fault("status", status=429, retry_after="Sat, 01 Jan 2050 00:00:01 GMT", date=ahead, times=1))
    result = client.ask("Say something nice.", max_tokens=4)
    assert result.fallback is None and result.done.location == "cloud"
    assert len(proxy.chat_requests()) == 2  # the 429, then the retry a second later on the server's clock
    proxy.seen.clear()
    behind = "Sat, 01 Jan 2000 00:00:00 GMT"  # 26 years behind: an hour on is still an hour
    proxy.set(Fault("status", status=429, retry_after="Sat, 01 Jan 2000 01:00:00 GMT", date=behind))
    result = client.ask("Say something nice.", max_tokens=4)
    assert result.fallback is not None and result.fallback.cause == "cloud_http"
    assert len(proxy.chat_requests()) == 1  # an hour is over max_retry_after_s: not retried
    assert "Traceback" not in handle.log()
