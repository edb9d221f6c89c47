"""Round nine of attacks on a running daemon: wall clocks that jump, long runs, and the lifecycle: each test
is one way in that broke, and now holds."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import psutil

from locod.client import Client
from locod.daemon.sessions import SessionStore, TurnTrail
from locod.policy.observation import Z

from .conftest import free_port, wait_for

YEAR_S = 365 * 86400


def test_spending_dated_after_today_does_not_spend_todays_cap(daemon_factory: Any) -> None:
    """A device whose clock ran ahead (a wrong RTC, a bad NTP server) dates its turns in the future; once the
    clock is put right, every dollar so dated was counted as spent today (``created >= midnight``), so the
    daily cap masked the cloud for as long as the clock took to catch up. And a Jetson without RTC that
    boots in 1970 counts the whole log as today's. Now only today's turns count."""
    handle = daemon_factory()
    assert handle.client().ask("Say hi.", max_tokens=2).done is not None
    assert handle.stop() == 0
    with sqlite3.connect(handle.db_path) as conn:
        conn.execute("UPDATE decisions SET created = created + ?, cost_usd = 5.0", [2 * 86400])
    restarted = daemon_factory({"cloud": {"daily_cap_usd": 1.0}})
    cloud = restarted.client().status()["cloud"]
    assert cloud["spent_today_usd"] == 0.0
    assert cloud["daily_cap_usd"] == 1.0


def _parked(park: Path) -> list[Path]:
    return sorted(park.glob("*.kv"))


def test_a_park_file_dated_in_the_future_does_not_evict_every_later_dialogue(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """The park is trimmed by deleting its least recently written files. A file written while the clock ran
    ahead stays the "newest" for as long as the clock takes to catch up: every dialogue parked after the
    clock's correction was deleted in its place, and parking was off in all but name. Now a file dated
    after now is the first to go."""
    config = {"local": {"cache_disk_mb": 1}}
    handle = daemon_factory(config)
    assert handle.client().ask("Say hi.", session="ahead", max_tokens=2).done is not None
    assert handle.stop() == 0
    park = tmp_path / "d" / "state" / "kvcache"
    [ahead] = _parked(park)
    future = time.time() + YEAR_S
    os.utime(ahead, (future, future))
    restarted = daemon_factory(config)
    assert restarted.client().ask("Say hello.", session="now", max_tokens=2).done is not None
    assert restarted.stop() == 0
    assert _parked(park) and ahead not in _parked(park)  # the one dated ahead went, not the one just parked
    resumed = daemon_factory(config)
    client = resumed.client()
    assert client.ask("Say yes.", session="now", max_tokens=2).done.outcome == "ok"
    assert client.status()["local"]["cache"]["disk_hits"] == 1


def test_a_long_dialogue_keeps_a_bounded_trail() -> None:
    """A session's history is bounded by characters, but its trail (where each turn ran, for the policy)
    grew by one entry a turn for as long as the dialogue went on: a client that keeps one session busy
    grows the daemon's memory without bound. Now the trail keeps the turns the policy reads, and counts
    the rest."""
    store = SessionStore(idle_s=600, max_sessions=10, max_chars=1000)
    session = store.open("s", "ipc")
    for i in range(10_000):
        trail = TurnTrail("cloud" if i % 2 else "local", (), "chat")
        store.record(session, [{"role": "user", "content": "q"}], "a", trail)
    assert session.turns == 10_000
    assert len(session.trail) == Z
    assert session.trail[-1].location == "cloud"  # the last turn's, for the policy's prev_cloud


def test_a_runtime_directory_removed_under_the_daemon_is_made_again(daemon_factory: Any) -> None:
    """tmpfiles cleaning the runtime directory (or a user's rm) took the daemon's socket: the daemon served
    on, reachable by no client (`locod stop` included: "locod is not running"), and a new `locod serve`
    was refused as its state directory was still held, leaving a user a pid to find. Now the daemon binds
    its socket again, with one log line."""
    handle = daemon_factory()
    assert handle.client().ask("Say hi.", max_tokens=2).done is not None
    shutil.rmtree(handle.home / "run")
    wait_for(lambda: (handle.home / "run" / "locod.sock").exists(), 30, "the socket to be bound again")
    assert handle.client().ask("Say hello.", max_tokens=2).done.outcome == "ok"
    assert "was removed under the running daemon; binding it again" in handle.log()
    stop = handle.cli("stop")
    assert stop.returncode == 0, stop.stderr
    assert handle.proc.wait(60) == 0
    assert [r["outcome"] for r in handle.rows()] == ["ok", "ok"]


def test_a_reload_asked_for_while_the_daemon_starts_does_not_kill_it(daemon_factory: Any) -> None:
    """SIGHUP's default action ends a process, and the daemon took it over only once its socket was bound:
    a reload asked for while it loaded its model (`systemctl reload` or `kill -HUP` right after a start, a
    storm of them) killed it, with nothing in its log. Now a SIGHUP during the start is held back and
    reloads once the daemon serves, and a storm of them while it serves leaves it serving."""
    handle = daemon_factory(wait=False)
    wait_for(lambda: "MESS+ predictor" in handle.log(), 120, "the daemon to be starting")  # past the imports
    while "serving on" not in handle.log():
        assert handle.proc.poll() is None, handle.log()
        handle.proc.send_signal(signal.SIGHUP)
        time.sleep(0.01)
    for _ in range(50):
        handle.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in handle.log(), 60, "the held-back reload")
    assert handle.client().ask("Say hi.", max_tokens=2).done.outcome == "ok"
    assert handle.stop() == 0
    assert "Traceback" not in handle.log()


def _connected_to(port: int) -> bool:
    """Whether this process still has a TCP connection to ``port`` open."""
    return any(c.raddr and c.raddr.port == port for c in psutil.Process().net_connections(kind="tcp"))


def test_a_client_that_opens_one_tcp_connection_at_a_time_is_never_refused(daemon_factory: Any) -> None:
    """The tcp door counts a host's connections from libzmq's events, and on a busy machine a close is
    reported some connections late: a client that connects, asks and closes in a loop was counted at
    ``max_tcp_per_host`` for connections it had closed, refused, and its request lost ("nothing from locod
    for 10 s; is it running?"). Now connections their peers have closed are not counted."""
    port = free_port()
    handle = daemon_factory({"daemon": {"tcp": f"tcp://127.0.0.1:{port}", "max_tcp_per_host": 3}})
    for _ in range(400):
        client = Client(f"tcp://127.0.0.1:{port}", timeout_s=10)
        try:
            assert client.status()["tcp"]["refused"] == 0
        finally:
            client.close()
            # One connection at a time on the wire too: a closed socket's connection ends when the shared
            # context's I/O thread gets to it, and on a loaded machine three were once still open (the
            # daemon cannot know those are about to close; the default max_tcp_per_host is 16).
            wait_for(lambda: not _connected_to(port), 10, "the client's connection to close")
    assert "refused a connection" not in handle.log()
