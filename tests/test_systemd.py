"""locod under systemd's protocols: sd_notify over a real datagram socket, the watchdog, signals, and the
unit files as systemd-analyze sees them."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .conftest import REPO, DaemonHandle, wait_for, write_config


@dataclass
class NotifyListener:
    path: Path
    messages: list[tuple[float, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def fields(self) -> list[str]:
        """Every KEY=VALUE line received, in order."""
        return [line for _, msg in self.messages for line in msg.splitlines()]

    def keys(self) -> list[str]:
        return [line.split("=", 1)[0] + ("=1" if line.endswith("=1") else "") for line in self.fields()]

    def watchdog_times(self) -> list[float]:
        return [t for t, msg in self.messages if msg == "WATCHDOG=1"]

    def close(self) -> None:
        self._stop.set()
        self.thread.join()
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.close()


def notified_daemon(daemon_factory: Any, notify: NotifyListener, config: dict[str, Any] | None = None) -> DaemonHandle:
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"}  # ping every 0.2 s
    return daemon_factory(config, extra_env=env)  # type: ignore[no-any-return]


def test_notify_sequence_ready_status_watchdog_reloading_stopping(daemon_factory: Any, notify: NotifyListener) -> None:
    handle = notified_daemon(daemon_factory, notify)
    wait_for(lambda: "READY=1" in notify.fields(), 30, "READY=1")
    first = notify.fields()[:2]
    assert first[0] == "READY=1" and first[1].startswith("STATUS=model smollm2-135m-instruct")
    wait_for(lambda: len(notify.watchdog_times()) >= 3, 10, "watchdog pings")
    handle.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: notify.fields().count("READY=1") == 2, 30, "READY after reload")
    lines = notify.fields()
    reloading = lines.index("RELOADING=1")
    assert lines[reloading + 1].startswith("MONOTONIC_USEC=")
    usec = int(lines[reloading + 1].split("=")[1])
    assert abs(usec / 1e6 - time.clock_gettime(time.CLOCK_MONOTONIC)) < 30
    assert handle.stop() == 0
    keys = notify.keys()
    assert keys.index("READY=1") < keys.index("RELOADING=1") < keys.index("STOPPING=1")
    assert keys[-1] == "STOPPING=1" or keys[keys.index("STOPPING=1") :].count("WATCHDOG=1") <= 2


def test_a_stalled_daemon_stops_the_watchdog(daemon_factory: Any, notify: NotifyListener) -> None:
    """The watchdog is pinged from the serving loop's passes, not by a timer of its own: a daemon that does
    not run its loop stops pinging (systemd then restarts it) and pings again once it runs. Nothing a client
    or another process does can stall the loop any more (a locked decision log waits off the loop), so the
    stall here is the whole process stopped, as a wedged one looks from outside."""
    handle = notified_daemon(daemon_factory, notify)
    client = handle.client(timeout_s=30)
    client.ask("Hi", max_tokens=2)
    wait_for(lambda: len(notify.watchdog_times()) >= 2, 10, "watchdog pings")
    handle.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(0.5)
        stalled_from = time.monotonic()
        time.sleep(2.0)
        pings_while_stalled = [t for t in notify.watchdog_times() if t > stalled_from]
    finally:
        handle.proc.send_signal(signal.SIGCONT)
    assert pings_while_stalled == []
    resumed = time.monotonic()
    wait_for(lambda: any(t > resumed for t in notify.watchdog_times()), 5, "pings to resume")
    assert client.ping()["pong"]


def test_sigterm_mid_generation_commits_the_record_and_exits_zero(daemon_factory: Any) -> None:
    handle = daemon_factory({"daemon": {"shutdown_grace_s": 1.0}})
    client = handle.client()
    frames = client.chat("Tell a very long story about mountains.", max_tokens=1800, temperature=0.0)
    assert next(frames).type == "decision"
    assert next(frames).type == "delta"
    handle.proc.send_signal(signal.SIGTERM)
    with pytest.raises(Exception) as info:
        for _ in frames:
            pass
    assert getattr(info.value, "code", None) == "cancelled"
    assert "shutting down" in str(info.value)
    assert handle.proc.wait(60) == 0
    (row,) = handle.rows()
    assert row["outcome"] == "cancelled" and row["error"] == "the daemon is shutting down"
    assert 0 < row["tokens_out"] < 1800
    assert handle.rows("PRAGMA integrity_check")[0]["integrity_check"] == "ok"


def test_sigterm_lets_a_short_turn_finish(daemon_factory: Any) -> None:
    handle = daemon_factory()
    client = handle.client()
    frames = client.chat("Say hello.", max_tokens=40, temperature=0.0)
    assert next(frames).type == "decision"
    handle.proc.send_signal(signal.SIGTERM)
    assert [f.type for f in frames][-1] == "done"
    assert handle.proc.wait(60) == 0
    assert handle.rows()[0]["outcome"] == "ok"


def test_sighup_with_a_broken_config_keeps_the_old_one(daemon_factory: Any) -> None:
    handle = daemon_factory({"routing": {"sla": 0.7}})
    client = handle.client()
    assert client.status()["routing"]["sla"] == 0.7
    handle.config_path.write_text("[routing]\nsla = 9\n")
    handle.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload rejected" in handle.log(), 10, "the rejection in the log")
    assert "routing.sla must be between 0.0 and 1.0" in handle.log()
    assert client.status()["routing"]["sla"] == 0.7
    assert client.ask("Still here?", max_tokens=2).done.outcome == "ok"
    refused = handle.cli("reload")  # asked for, the reason comes back to whoever asked
    assert refused.returncode == 2 and "routing.sla must be between 0.0 and 1.0" in refused.stderr, refused.stderr
    write_config(handle.config_path, {"routing": {"sla": 0.6}, "daemon": {"queue_limit": 99}})
    reloaded = client.reload()
    assert reloaded["reloaded"] is True and reloaded["restart_needed"] == ["daemon"]
    assert client.status()["routing"]["sla"] == 0.6


def test_journald_lines_have_priority_and_no_timestamp(daemon_factory: Any) -> None:
    handle = daemon_factory(extra_env={"JOURNAL_STREAM": "8:12345"})
    handle.stop()
    lines = [ln for ln in handle.log().splitlines() if ln.strip()]
    assert any(ln.startswith("<6>locod.daemon.server: locod ") for ln in lines)
    assert all(ln.startswith("<") for ln in lines), lines


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_files_verify(tmp_path: Path) -> None:
    locod = Path(sys.executable).with_name("locod")
    system = (REPO / "systemd/locod.service").read_text().replace("/opt/locod/venv/bin/locod", str(locod))
    (tmp_path / "locod.service").write_text(system)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "locod.service")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    user = (REPO / "systemd/user/locod.service").read_text().replace("%h/.local/share/locod/venv/bin/locod", str(locod))
    (tmp_path / "user").mkdir()
    (tmp_path / "user/locod.service").write_text(user)
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    result = subprocess.run(
        ["systemd-analyze", "--user", "verify", str(tmp_path / "user/locod.service")],
        capture_output=True,
        text=True,
        env={"XDG_RUNTIME_DIR": str(runtime), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(tmp_path / "locod.service")],
        capture_output=True,
        text=True,
    )
    score = float(security.stdout.rsplit("locod.service: ", 1)[1].split()[0])
    assert score <= 2.0, security.stdout[-300:]
