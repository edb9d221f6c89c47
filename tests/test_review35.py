"""Review of the session's time and policy changes: a day whose first hour a DST end repeats (Cuba), and
a policy whose weights are in a side file, reached through a symlink, a Throttle's interval ending under a
flood, a report's hours after a half-hour DST change. Each test is one way in that broke,
and now holds."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from locod.daemon.history import parse_since, read_history
from locod.daemon.logs import Throttle
from locod.daemon.records import DecisionLog
from locod.daemon.tallies import local_midnight
from locod.policy.observation import N_ACTIONS, OBS_DIM
from locod.policy.onnx_policy import DEFAULT_POLICY, OnnxPolicy

from .conftest import Lines
from .test_time35 import local, write_turns


def posix_offset(east_s: int) -> str:
    """A POSIX TZ offset (hours west of UTC) for ``east_s`` seconds east of it."""
    west = -east_s
    return f"{'-' if west < 0 else ''}{abs(west) // 3600}:{abs(west) % 3600 // 60:02d}"


def zone_repeating_midnight_now() -> str:
    """A POSIX zone in which it is now 00:30 of a day whose first hour is repeated: DST ends today at 01:00
    DST, the clock going back to 00:00 (Cuba's rule: `America/Havana`). Built around the real clock, so the
    daemon's own ``time.time()`` is in the repeated hour, with half an hour on each side."""
    now = time.time()
    dst_east = int((1800 - now % 86400) % 86400) // 60 * 60
    dst_east -= 86400 if dst_east > 43200 else 0
    day = time.gmtime(now + dst_east)
    ends = day.tm_yday - 1  # POSIX's zero-based day of the year, 29 February counted
    return f"STD{posix_offset(dst_east - 3600)}DST{posix_offset(dst_east)},0/0,{ends}/1"


def test_the_caps_day_is_found_in_the_hour_a_dst_end_repeats_midnight(
    zone: Callable[[str], None], tmp_path: Path
) -> None:
    """In Cuba DST ends at 01:00, the clock going back to 00:00: the day's first hour is lived twice. In
    its first pass, mktime's midnight of the day was the second 00:00, an hour after now, so no tally was
    ever today's: the daily cap's check read the log again and again, and every turn hung for that hour
    (a spinning thread per turn). Now a day begins at its first midnight."""
    zone(zone_repeating_midnight_now())
    now = time.time()
    assert time.localtime(now).tm_hour == 0 and time.localtime(now).tm_isdst == 1  # the first pass
    assert local_midnight(now) <= now
    log = DecisionLog(tmp_path / "locod.db")
    committed: list[float] = []
    checking = threading.Thread(target=lambda: committed.append(log.today.committed()), daemon=True)
    checking.start()
    checking.join(60)  # a hang, not a time: it answers at once, or never
    assert committed == [0.0]
    log.close()


def test_a_symlinked_policy_reads_its_side_file_beside_the_file_it_links_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A policy kept by version and chosen by a symlink (`policy.onnx -> v3/policy.onnx`) has its side file
    beside the file the link names, where onnxruntime itself looks for it (it refuses a side file outside
    that folder). The folder was the link's: the policy was refused as not loadable."""
    import onnx

    versions = tmp_path / "v3"
    versions.mkdir()
    saved = versions / "policy.onnx"
    onnx.save(onnx.load(str(DEFAULT_POLICY)), str(saved), save_as_external_data=True, location="w", size_threshold=0)
    link = tmp_path / "policy.onnx"
    link.symlink_to(saved)
    monkeypatch.chdir("/")  # the daemon under systemd
    observation = np.random.default_rng(35).random(OBS_DIM, dtype=np.float32)
    mask = np.ones(N_ACTIONS, dtype=np.float32)
    linked, whole = OnnxPolicy(link), OnnxPolicy(DEFAULT_POLICY)
    assert np.array_equal(linked.log_probs(observation, mask), whole.log_probs(observation, mask))


def test_a_timer_that_fires_as_its_interval_is_said_says_nothing_more() -> None:
    """At an interval's end under a flood, its timer could fire while ``say`` logged the flood's next line
    (the interval over, seen in a flood: a second line 0.2 ms after the first, from the timer's thread). The
    timer, waiting for the lock, then took the timer armed by the line held after that and logged that line
    at once: two lines in an interval. Here the timer's part is played at that moment, as its thread runs
    it; now a timer that was replaced says nothing, and the held line waits for its interval's end."""
    logger = logging.getLogger("locod.test.review35")
    lines = Lines()
    logger.addHandler(lines)
    throttle = Throttle(logger, every_s=0.05)
    try:
        throttle.say("flood", logging.WARNING, "event %d", 0)
        throttle.say("flood", logging.WARNING, "event %d", 1)  # held: its timer armed
        stale = throttle._timers["flood"]
        stale.cancel()  # its run is played below: fired, it waited for the lock while the next line was said
        said = 2
        while len(lines.said) < 2:  # the interval ends: the next line is said, with the count
            throttle.say("flood", logging.WARNING, "event %d", said)
            said += 1
        throttle.say("flood", logging.WARNING, "event %d", said)  # held in the new interval
        stale.function(*stale.args)  # the fired timer gets the lock
        assert lines.said[1:] == [f"event {said - 1} ({said - 2} more since the last such line)"]
    finally:
        throttle.flush()
        logger.removeHandler(lines)
    assert lines.said[2:] == [f"event {said}"]  # the held line, said once


def test_the_reports_hours_stay_on_the_local_hour_after_a_half_hour_dst_change(
    zone: Callable[[str], None], tmp_path: Path
) -> None:
    """Lord Howe Island moves its clock half an hour for DST. Hours were laid on the local grid of the
    period's first second, so after the change every hour's bar began at :30 and a turn at 10:45 was drawn
    in the bar labelled 10:30, as India's were before the grid was local. Now each bar begins on the hour
    the clock shows then (the change's own hour is split in two)."""
    zone("Australia/Lord_Howe")
    changed = local(2026, 10, 4, 3)  # 02:00 became 02:30 that night
    assert time.localtime(changed - 3600).tm_gmtoff + 1800 == time.localtime(changed).tm_gmtoff
    turns = [local(2026, 10, 3, 10, 45), local(2026, 10, 4, 10, 45)]
    write_turns(tmp_path / "locod.db", turns)
    history = read_history(tmp_path / "locod.db", parse_since("2d"), now=local(2026, 10, 4, 20))
    assert history.bucket_s == 3600
    starts = [time.localtime(b.start) for b in history.buckets]
    off_the_hour = [time.strftime("%d %H:%M", start) for start in starts if start.tm_min]
    assert off_the_hour == ["04 01:30"]  # the change's hour, split in two
    drawn = {time.strftime("%d %H:%M", time.localtime(b.start)): b.turns for b in history.buckets if b.turns}
    assert drawn == {"03 10:00": 1, "04 10:00": 1}
