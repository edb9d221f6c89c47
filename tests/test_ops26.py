"""Operational weak spots (ops26): a flood of SIGHUPs, the status frame's masked local models, the judge's
cost held before its call, the breaker after the network comes back, the MESS+ queue after a kill."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from locod.daemon.config import load_config
from locod.daemon.records import DecisionLog
from locod.daemon.server import Daemon
from locod.protocol import DecisionFrame, DoneFrame

from . import faultproxy
from .conftest import SECRET, CloudServer, cloud_config, free_port, wait_for, write_config
from .faultproxy import Fault, FaultProxy
from .test_routing import auto_config
from .test_twenty_first_walk import on_port

DEAD_URL = "http://127.0.0.1:1/v1"  # nothing listens on port 1: every connection is refused at once
FIXTURES = Path(__file__).parent / "fixtures" / "telemetry"

RELOADED = "configuration reloaded from"


@contextmanager
def daemon_in_this_process(config_path: Path) -> Iterator[Daemon]:
    """A real daemon started in this process (its model loaded, its socket bound, its signal handlers
    installed in this process's main thread), not serving: the test runs its loop's steps itself. The
    test process's own handlers are put back afterwards."""
    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    daemon = Daemon(load_config(config_path), str(config_path))
    try:
        daemon.start()
        yield daemon
    finally:
        signal.set_wakeup_fd(-1)
        for sig, handler in kept.items():
            signal.signal(sig, handler)
        daemon.close()


def _paths(tmp_path: Path, models_dir: Path, sla: float) -> dict[str, Any]:
    dirs = {"state_dir": tmp_path / "state", "runtime_dir": tmp_path / "run", "models_dir": models_dir}
    return {"paths": {k: str(v) for k, v in dirs.items()}, "routing": {"sla": sla}}


def test_a_flood_of_sighups_reloads_once_and_the_last_config_wins(
    tmp_path: Path, models_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each SIGHUP reloaded the config, one reload per signal, the serving loop answering nothing meanwhile
    (on this machine 200 signals 2 ms apart made 142 reloads, seconds of a stalled loop). Now the signals
    read in one pass reload once, with the config on disk then; those that arrive during that reload make
    one more, which reads the config written last. The signals are real, sent to this process, whose
    handlers the daemon installed: the loop's step that reads them is run here, between floods."""
    config_path = write_config(tmp_path / "config.toml", _paths(tmp_path, models_dir, 0.5))
    caplog.set_level(logging.INFO, logger="locod.daemon.server")
    with daemon_in_this_process(config_path) as daemon:
        for sla in (0.6, 0.7, 0.8):  # a config tool rewriting the file, signalling after each write
            write_config(config_path, _paths(tmp_path, models_dir, sla))
            for _ in range(20):
                os.kill(os.getpid(), signal.SIGHUP)
        daemon._on_signals()
        assert caplog.text.count(RELOADED) == 1
        assert daemon.config.routing.sla == 0.8

        reloading = daemon.notifier.reloading

        def flooded_during_the_reload() -> None:  # the next writes and signals come while it runs
            reloading()
            if daemon.config.routing.sla == 0.8:
                write_config(config_path, _paths(tmp_path, models_dir, 0.9))
                for _ in range(20):
                    os.kill(os.getpid(), signal.SIGHUP)

        monkeypatch.setattr(daemon.notifier, "reloading", flooded_during_the_reload)
        caplog.clear()
        os.kill(os.getpid(), signal.SIGHUP)
        daemon._on_signals()  # this reload reads 0.8 or 0.9, and its flood asks for one more
        daemon._on_signals()
        daemon._on_signals()  # nothing left
        assert caplog.text.count(RELOADED) == 2
        assert daemon.config.routing.sla == 0.9


def test_a_daemon_flooded_with_sighups_serves_and_answers_reload(daemon_factory: Any) -> None:
    """While a script sends SIGHUPs, a streaming turn is answered and `locod reload` answers with its result,
    the config last written in force."""
    handle = daemon_factory({"routing": {"sla": 0.5}})
    client = handle.client(turn_timeout_s=300)
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            handle.proc.send_signal(signal.SIGHUP)
            stop.wait(0.002)

    sender = threading.Thread(target=flood)
    sender.start()
    try:
        answer = client.ask("Count from one to ten.", max_tokens=24)
        write_config(handle.config_path, {"routing": {"sla": 0.75}})
        reloaded = handle.cli("reload")
    finally:
        stop.set()
        sender.join()
    assert answer.done.outcome == "ok"
    assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr
    wait_for(lambda: client.status()["routing"]["sla"] == 0.75, 60, "the last config in force")
    assert handle.proc.poll() is None and "Traceback" not in handle.log()


def test_status_says_local_models_are_masked_by_the_rule_turns_are_decided_by(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """On battery below routing.battery_critical_pct, routing masks the local models while a cloud model's
    endpoint is usable. `locod status` recomputed that from the battery alone: with the breaker open, every
    turn answered here, it still said the local models waited. Now the daemon says in its status frame
    whether they are masked and why (``routing.local_masked``, from the decider's own rule), and the CLI
    shows that."""
    root = tmp_path / "laptop"
    shutil.copytree(FIXTURES / "laptop-battery", root)
    (root / "sys/class/power_supply/BAT0/capacity").write_text("5\n")
    config = cloud_config(DEAD_URL, mode="auto", max_retries=0, breaker_failures=1)
    config["routing"].update(shadow="off", escalate=False)
    config["telemetry"] = {"sysfs_root": str(root / "sys"), "procfs_root": str(root / "proc"), "nvml": False}
    handle = daemon_factory(config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    client = handle.client(turn_timeout_s=300)
    masked = client.status()["routing"]["local_masked"]
    assert masked and "battery_critical_pct (10%)" in masked
    assert f"battery 5% (local models masked: {masked})" in handle.cli("status").stdout

    first = client.ask("What is the plural of mouse?", max_tokens=4)  # to the cloud, refused: breaker opens
    assert first.decision.location == "cloud" and first.done.outcome == "fallback"
    assert client.status()["cloud"]["breaker"] == "open"
    assert client.status()["routing"]["local_masked"] is None
    status = handle.cli("status").stdout
    assert "battery 5%, on battery" in status and "battery_critical_pct" not in status, status
    second = client.ask("What is the plural of goose?", max_tokens=4)
    assert second.decision.location == "local" and "local masked" not in second.decision.reason


def test_a_kill_during_the_judges_call_leaves_its_cost_counted(daemon_factory: Any, proxy: FaultProxy) -> None:
    """The judge grades an explored turn after it ended and added the call's price to the turn's cost once it
    answered: a daemon killed during the call (the cloud slow, an OOM, kill -9) lost it from today's spend and
    the daily cap, as cloud turns once did. Now the most the call may cost is written to the turn's cost
    before it is made (and replaced by what it did cost after), as a cloud turn's record holds it."""
    config = auto_config(proxy.base_url, judge=True, explore_c=10.0)  # every turn explores: graded
    handle = daemon_factory(config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    frames = handle.client(turn_timeout_s=300).chat("What is 2+2?", max_tokens=4, temperature=0.0)
    decision = next(frames)
    assert isinstance(decision, DecisionFrame) and decision.explored
    if decision.location == "cloud":  # the turn's own call passes: only the grading is slowed
        wait_for(lambda: proxy.seen, 120, "the turn's cloud call")
    calls = len(proxy.seen)
    proxy.set(Fault("delay", delay_s=600))  # the endpoint takes the grading and keeps at it
    done = list(frames)[-1]
    assert isinstance(done, DoneFrame), done
    wait_for(lambda: len(proxy.seen) > calls, 120, "the judge's call")
    handle.proc.send_signal(signal.SIGKILL)
    handle.proc.wait()
    log = DecisionLog(handle.db_path)  # what the next start does: sums today's spend from the log
    try:
        (row,) = handle.rows()
        judge_most = 2.0 * 4 / 1e6  # its verdict's 4 tokens at usd_per_mtok_out alone
        assert row["cost_usd"] >= done.cost_usd + judge_most, row
        assert log.spent_today() == pytest.approx(row["cost_usd"]), "the judge's call is not counted today"
    finally:
        log.close()


def test_the_breaker_lets_a_call_try_once_the_probe_finds_the_network_back(
    daemon_factory: Any, cloud_server: CloudServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A laptop whose Wi-Fi came back: the breaker, opened because calls found no connection, stayed open for
    its whole cooldown (60 s by default, 600 s here) though the network probe reached the endpoint again,
    and every turn meanwhile was answered locally. Now a probe that connects ends the cooldown of a breaker
    opened for want of a connection: the next turn tries the cloud (its failure alone opens it again)."""
    port = free_port()  # nothing listens there yet: the endpoint refuses, as with no route to it
    monkeypatch.setattr(faultproxy, "serve", on_port(port))
    config = cloud_config(f"http://127.0.0.1:{port}/v1", timeout_s=60.0, max_retries=0, breaker_failures=1)
    config["telemetry"] = {"probe_interval_s": 1.0}
    handle = daemon_factory(config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    client = handle.client(turn_timeout_s=300)
    cut_off = client.ask("What is the plural of mouse?", max_tokens=4)
    assert cut_off.done.outcome == "fallback" and client.status()["cloud"]["breaker"] == "open"
    wait_for(lambda: client.status()["telemetry"]["cloud_reachable"] is False, 60, "the probe to fail")
    proxy = FaultProxy(cloud_server.base_url.rsplit("/v1", 1)[0]).start()  # the network is back
    try:
        wait_for(lambda: client.status()["cloud"]["breaker"] == "closed", 120, "the breaker to let a call try")
        back = client.ask("What is the plural of goose?", max_tokens=4)
        assert back.decision.location == "cloud" and back.done.outcome == "ok", back.decision.reason
        assert "is reachable again: its breaker lets the next call try" in handle.log()
    finally:
        proxy.stop()


def test_a_breaker_opened_by_the_endpoints_answers_keeps_its_cooldown(daemon_factory: Any, proxy: FaultProxy) -> None:
    """The probe connects whatever the endpoint answers: a breaker opened by HTTP 500s keeps its cooldown
    while the probe reaches the endpoint, so a failing endpoint is not tried at every probe."""
    config = cloud_config(proxy.base_url, max_retries=0, breaker_failures=1)
    config["telemetry"] = {"probe_interval_s": 1.0}
    handle = daemon_factory(config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    client = handle.client(turn_timeout_s=300)
    proxy.set(Fault("status", status=500))
    assert client.ask("What is the plural of mouse?", max_tokens=4).done.outcome == "fallback"
    opened = time.time()

    def probed_since() -> bool:  # a probe connected after the breaker opened (the sample says when)
        t = client.status()["telemetry"]
        return bool(t["cloud_reachable"]) and t["rtt_age_s"] is not None and t["taken"] - t["rtt_age_s"] > opened

    wait_for(probed_since, 60, "a probe after the breaker opened")
    assert client.status()["cloud"]["breaker"] == "open"


def test_a_turn_settled_after_the_last_save_is_settled_again_from_the_log(
    daemon_factory: Any, proxy: FaultProxy
) -> None:
    """A routed turn's completion is committed before its `done`, and MESS+'s queue settles after, saved to
    its own file: a daemon killed between the two (or whose saves fail until then) lost that turn from the
    queue and the attained satisfaction for good; its label, when it came, trained but moved nothing. Now
    the log keeps what each turn settled with (``s_settled``) and a start settles those the saved state has
    not. The state's saves are made to fail here (its temporary file's name taken by a directory), so the
    file stays at the first turn whenever the kill comes."""
    config = auto_config(proxy.base_url)
    handle = daemon_factory(config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    client = handle.client(turn_timeout_s=300)
    assert client.ask("What is the plural of mouse?", max_tokens=4).done.outcome in ("ok", "fallback")
    # settled and saved: status reads the state under the lock its settling holds through the save
    wait_for(lambda: client.status()["routing"]["turns"] == 1, 60, "the first turn's settling")
    blocker = handle.home / "state" / "messplus.tmp"
    blocker.mkdir()  # every save from now on fails: the file keeps the first turn
    second = client.ask("What is the plural of goose?", max_tokens=4).done
    wait_for(lambda: "cannot save the MESS+ state" in handle.log(), 60, "the second turn's settling")
    assert client.status()["routing"]["turns"] == 2
    handle.proc.send_signal(signal.SIGKILL)
    handle.proc.wait()
    blocker.rmdir()
    assert all(row["s_settled"] is not None for row in handle.rows())
    again = daemon_factory(config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    assert again.home == handle.home
    assert again.client().status()["routing"]["turns"] == 2
    assert "settled 1 turn(s) the decision log answered before the last stop" in again.log()
    assert f"(decisions {second.decision})" in again.log()
