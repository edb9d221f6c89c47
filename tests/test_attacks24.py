"""Attack round 24: kill -9 at many moments, as a property. A real daemon (the embedded model; the loopback
cloud behind the fault proxy) serves a mix of turns on both doors (local, cloud, routed with escalation and
shadow answers, labels, a turn its client cancels, an HTTP completion) and is killed with SIGKILL after a
seeded random delay, then started again on the same state, CYCLES times. What the clients saw and what the
state directory holds must agree: every turn whose ``decision`` frame arrived has one committed record that
says how it ended, a label acknowledged is stored, today's spend never goes back, each restart is clean and
`locod status`, `decisions` and `report` read the state after it."""

from __future__ import annotations

import datetime
import http.client
import json
import random
import signal
import sqlite3
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from locod.client import Client
from locod.daemon.records import DecisionLog
from locod.errors import LocodError
from locod.protocol import DecisionFrame, DoneFrame, EscalatedFrame

from .conftest import SECRET, DaemonHandle, cloud_config, free_port, start_daemon, wait_for
from .faultproxy import Fault, FaultProxy
from .test_escalation import _daemon, _head

SEED = 24  # the kill moments and the turn mix; stated so that a failing run can be replayed
CYCLES = 15


@dataclass
class Seen:
    """What the clients of the whole run saw."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    decided: dict[int, str] = field(default_factory=dict)  # decision id -> the kind of turn it was
    done: dict[int, DoneFrame] = field(default_factory=dict)
    cancelled: set[int] = field(default_factory=set)  # its client left after the decision frame
    labelled: dict[int, bool] = field(default_factory=dict)  # labels the daemon acknowledged
    http_done: set[int] = field(default_factory=set)  # HTTP completions answered whole (x-locod-decision)

    def decision(self, frame: DecisionFrame, kind: str) -> None:
        with self.lock:
            assert frame.decision not in self.decided, f"decision {frame.decision} given to two turns"
            self.decided[frame.decision] = kind


def socket_turns(endpoint: str, seen: Seen, worker: int, cycle: int, stop: threading.Event) -> None:
    """One client's turns until the daemon dies under it: forced local, forced cloud, routed (which may
    escalate, and has shadow answers), a label for each answered one, and a turn left after its decision."""
    kinds = ("local", "cloud", "routed", "cancel")
    try:
        with Client(endpoint, turn_timeout_s=300) as client:
            for i in range(100):
                if stop.is_set():
                    return
                kind = kinds[(worker + i) % len(kinds)]
                force = {"local": "local", "cloud": "cloud"}.get(kind)
                prompt = f"Worker {worker} in cycle {cycle}, turn {i}: name a colour."
                frames = client.chat(prompt, session=f"w{worker}", force=force, max_tokens=12)
                decided: int | None = None
                for frame in frames:
                    if isinstance(frame, DecisionFrame):
                        decided = frame.decision
                        seen.decision(frame, kind)
                        if kind == "cancel":
                            with seen.lock:
                                seen.cancelled.add(decided)
                            frames.close()  # leaves the turn: the client reconnects, the daemon cancels it
                            break
                    if isinstance(frame, DoneFrame):
                        with seen.lock:
                            seen.done[frame.decision] = frame
                if decided is not None and decided in seen.done and i % 2 == 0:
                    client.feedback(decided, i % 4 == 0)
                    with seen.lock:
                        seen.labelled[decided] = i % 4 == 0
    except LocodError:
        pass  # the daemon died under us: expected


def http_turns(port: int, seen: Seen, cycle: int, stop: threading.Event) -> None:
    """Streamed HTTP completions: the decision is the 200's ``x-locod-decision`` header, sent with the
    decision; the answer is whole when its stream ends with ``[DONE]``."""
    for i in range(100):
        if stop.is_set():
            return
        body = {"model": "auto", "stream": True, "max_tokens": 8}
        body["messages"] = [{"role": "user", "content": f"HTTP {cycle}.{i}: a fruit?"}]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=300) as reply:
                decision = int(reply.headers["x-locod-decision"])
                with seen.lock:
                    assert decision not in seen.decided, f"decision {decision} given to two turns"
                    seen.decided[decision] = "http"
                whole = reply.read().rstrip().endswith(b"data: [DONE]")
        except (OSError, http.client.HTTPException):
            return  # the daemon died under us (a reset, a refused connection, a cut stream)
        if whole:
            with seen.lock:
                seen.http_done.add(decision)


def db_rows(db: Path, sql: str = "SELECT * FROM decisions ORDER BY id") -> list[dict[str, Any]]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql)]
    finally:
        conn.close()


def pending(db: Path) -> int:
    """Records a killed daemon left ``pending`` (read-only, as `locod decisions` reads a stopped daemon's log)."""
    if not db.exists():
        return 0
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM decisions WHERE outcome = 'pending'").fetchone()[0])
    finally:
        conn.close()


def check_restart(handle: DaemonHandle, tmp_path: Path, left: int, spent_before: float, day: datetime.date) -> float:
    """The restarted daemon tells the truth (its pid, the ``left`` pending records it marked interrupted,
    today's spend as the log sums it, never less than before the kill) and `locod decisions` and `report`
    read its log; returns today's spend. The commands run at once, as a user's might."""
    commands = {
        "status": ("status", "--json"),
        "decisions": ("decisions", "--json", "--limit", "1000"),
        "report": ("report", "--since", "1d", "--out", str(tmp_path / "report.html")),
    }
    done: dict[str, Any] = {}
    runs = [threading.Thread(target=lambda k=k, a=a: done.update({k: handle.cli(*a)})) for k, a in commands.items()]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    assert done["status"].returncode == 0 and done["decisions"].returncode == 0, (done["status"], done["decisions"])
    status, listed = json.loads(done["status"].stdout), json.loads(done["decisions"].stdout)
    # an empty log has nothing to draw, and says so (rc 1)
    assert done["report"].returncode == (0 if listed else 1), done["report"].stderr
    assert status["pid"] == handle.proc.pid, "status names another process than the one serving"
    assert status["interrupted_at_start"] == left, status["interrupted_at_start"]
    assert not [r for r in listed if r["outcome"] == "pending"], "a record the kill cut is still pending"
    spent = float(status["cloud"]["spent_today_usd"])
    midnight = datetime.datetime.combine(datetime.date.today(), datetime.time()).timestamp()
    logged = db_rows(handle.db_path, f"SELECT TOTAL(cost_usd) AS usd FROM decisions WHERE finished >= {midnight}")
    assert abs(spent - logged[0]["usd"]) < 2e-6, f"status says {spent} spent today, the log {logged[0]['usd']}"
    if datetime.date.today() == day:  # a run across local midnight starts a new day's spend, rightly
        assert spent >= spent_before - 1e-9, f"today's spend went back from {spent_before} to {spent} after a kill"
    return spent


def test_kill_9_at_random_moments_loses_no_record_and_keeps_the_state(
    tmp_path: Path, models_dir: Path, proxy: FaultProxy
) -> None:
    rng = random.Random(SEED)
    home = tmp_path / "crashy"
    port = free_port()
    config = cloud_config(proxy.base_url, mode="auto", timeout_s=120.0, daily_cap_usd=10.0)
    config["routing"].update(shadow="always")
    # A tiny dialogue cache: states are parked on disk at almost every turn, so kills land during those writes.
    config["local"] = {"max_tokens": 12, "cache_mb": 1, "cache_disk_mb": 64}
    config["http"] = {"listen": f"127.0.0.1:{port}"}
    env = {"LOCOD_CLOUD_API_KEY": SECRET}
    seen = Seen()
    spent, day = 0.0, datetime.date.today()
    for cycle in range(CYCLES):
        left = pending(home / "state" / "locod.db")
        handle = start_daemon(home, models_dir, config, extra_env=env)
        stop = threading.Event()
        try:
            spent = check_restart(handle, tmp_path, left, spent, day)
            threads = [
                threading.Thread(target=socket_turns, args=(handle.endpoint, seen, w, cycle, stop)) for w in range(3)
            ]
            threads.append(threading.Thread(target=http_turns, args=(port, seen, cycle, stop)))
            for t in threads:
                t.start()
            if cycle % 4 == 0:  # some kills come after turns have ended, however slow the machine
                wait_for(lambda: len(seen.done) > 0, 300, "a turn to end before the kill")
            time.sleep(rng.uniform(0.3, 8.0))
        finally:  # killed whatever happens: a failed wait must not leave this cycle's daemon running
            stop.set()
            handle.proc.send_signal(signal.SIGKILL)
            handle.proc.wait()
        for t in threads:
            t.join(60)
            assert not t.is_alive(), "a client still waits on a killed daemon"
    left = pending(home / "state" / "locod.db")
    final = start_daemon(home, models_dir, config, extra_env=env)
    try:
        check_restart(final, tmp_path, left, spent, day)
        assert final.rows("PRAGMA integrity_check")[0]["integrity_check"] == "ok"
        rows = {r["id"]: r for r in final.rows()}
        lost = sorted(set(seen.decided) - set(rows))
        assert not lost, f"turns whose decision frame was received have no record: {lost}"
        assert not [i for i, r in rows.items() if r["outcome"] == "pending"]
        request_ids = [r["request_id"] for r in rows.values()]
        assert len(request_ids) == len(set(request_ids)), "a turn recorded twice"
        for decision, frame in seen.done.items():
            assert rows[decision]["outcome"] == frame.outcome, (decision, rows[decision])
            assert abs((rows[decision]["cost_usd"] or 0.0) - frame.cost_usd) < 1e-6 or rows[decision]["cost_usd"] > 0
        for decision in seen.http_done:
            assert rows[decision]["outcome"] in ("ok", "fallback", "escalated"), rows[decision]
        for decision in set(seen.decided) - set(seen.done) - seen.http_done:
            row = rows[decision]
            assert row["outcome"] != "pending"
            if row["outcome"] == "interrupted":
                assert row["error"] == "daemon stopped during the turn" and row["finished"], row
        escalating = [r for r in rows.values() if r["location"] == "local" and r["confidence"] is not None]
        called = [r for r in rows.values() if r["outcome"] == "interrupted" and r["location"] == "cloud"] + [
            r for r in escalating if r["outcome"] == "interrupted" and not json.loads(r["confidence"])["kept"]
        ]
        assert all(r["cost_usd"] > 0 and r["cost_estimated"] == 1 for r in called), "a cut cloud call went uncounted"
        for decision, satisfied in seen.labelled.items():
            assert rows[decision]["satisfied"] == int(satisfied), rows[decision]
        status = Client(final.endpoint).status()
        user_labels = sum(1 for r in rows.values() if r["label_source"] == "user")
        assert user_labels >= len(seen.labelled)
        state_dir = home / "state"
        assert not list(state_dir.glob("messplus.npz.bad-*")), "a half-written MESS+ state was found"
        assert not list((state_dir / "kvcache").glob("*.tmp")), "a half-written parked state was kept"
        assert "ignoring parked KV state" not in final.log(), "a parked state was written wrong"
        assert Client(final.endpoint).ask("after the storm", force="local", max_tokens=2).done.outcome == "ok"
        assert status["routing"]["turns"] > 0
    finally:
        final.stop()
    kinds = {seen.decided[d] for d in seen.done} | {"http" for _ in seen.http_done}
    assert {"local", "cloud", "http"} <= kinds, f"the mix did not run: {kinds}"
    assert seen.cancelled and seen.labelled


def test_a_cloud_call_cut_by_a_kill_stays_counted_against_the_daily_cap(
    tmp_path: Path, models_dir: Path, proxy: FaultProxy
) -> None:
    """A cloud turn killed while the endpoint answers it was paid for (providers bill what they generated),
    but its record ended ``interrupted`` with no cost: today's spend lost it, and a daemon killed during each
    cloud turn (an OOM, a crash loop under ``Restart=on-failure``) never reached its daily cap. The record now
    holds, from before the call, what the call may cost (the price the cap's shield admitted it at)."""
    home = tmp_path / "capped"
    config = cloud_config(proxy.base_url, timeout_s=120.0, daily_cap_usd=10.0)
    env = {"LOCOD_CLOUD_API_KEY": SECRET}
    proxy.faults.append(Fault("delay", delay_s=600, times=1))  # the endpoint takes the call and keeps at it
    handle = start_daemon(home, models_dir, config, extra_env=env)
    try:
        with Client(handle.endpoint, turn_timeout_s=300) as client:
            frames = client.chat("Name three rivers.", max_tokens=40)
            decision = next(frames)
            assert isinstance(decision, DecisionFrame) and decision.location == "cloud"
            wait_for(lambda: proxy.seen, 120, "the endpoint to receive the call")
            handle.proc.send_signal(signal.SIGKILL)
            handle.proc.wait()
            frames.close()
    finally:
        handle.stop()
    again = start_daemon(home, models_dir, config, extra_env=env)
    try:
        row = again.rows("SELECT * FROM decisions WHERE id = ?", (decision.decision,))[0]
        assert row["outcome"] == "interrupted"
        most = config["cloud"]["models"][0]["usd_per_mtok_out"] * 40 / 1e6  # the answer's max_tokens alone
        assert row["cost_usd"] >= most and row["cost_estimated"] == 1, row
        spent = again.client().status()["cloud"]["spent_today_usd"]
        assert spent == round(row["cost_usd"], 6), "the interrupted call's cost is not counted today"
    finally:
        again.stop()


def test_an_escalation_cut_by_a_kill_keeps_its_cloud_call_counted(
    daemon_factory: Any, tmp_path: Path, proxy: FaultProxy
) -> None:
    """The same for a turn answered locally first and escalated: the record kept the local answer's
    confidence before the cloud phase, but not what that phase may cost."""
    handle = _daemon(daemon_factory, tmp_path, proxy, _head(min_weight=1000.0, bias=10.0), "escalating")
    proxy.set(Fault("delay", delay_s=600.0))  # the endpoint takes the call and keeps at it
    for frame in handle.client().chat("What is the plural of mouse?", max_tokens=24, temperature=0.0):
        if isinstance(frame, EscalatedFrame):
            break
    wait_for(lambda: proxy.seen, 120, "the endpoint to receive the call")
    handle.proc.send_signal(signal.SIGKILL)
    handle.proc.wait()
    log = DecisionLog(handle.db_path)  # what the next start does: marks the turn, sums today's spend
    try:
        (row,) = handle.rows()
        assert row["outcome"] == "interrupted" and json.loads(row["confidence"])["kept"] is False
        assert row["cost_usd"] >= 2.0 * 24 / 1e6 and row["cost_estimated"] == 1, row  # at least its answer's price
        assert log.spent_today() == row["cost_usd"], "the escalation's cloud call is not counted today"
    finally:
        log.close()


def test_a_label_committed_before_a_kill_is_learned_at_the_next_start(tmp_path: Path, models_dir: Path) -> None:
    """A label is committed to the log, then learned and the MESS+ state saved, then acknowledged. Killed
    between the commit and the save, the daemon left the label stored but never learned: the queue kept the
    turn's prediction and the predictor never moved, and the label sent again (its client had no answer) was
    refused as final. The log's state after such a kill is made here by writing the label as ``label`` does."""
    home = tmp_path / "labelled"
    config = {"routing": {"mode": "auto", "explore_c": 0.0}, "local": {"max_tokens": 4}}
    handle = start_daemon(home, models_dir, config)
    try:
        decision = handle.client().ask("Name a colour.").done.decision
        before = handle.client().status()["routing"]
        assert before["pending_labels"] == 1, before
    finally:
        assert handle.stop() == 0  # the state saved, the prediction in it waiting for its label
    conn = sqlite3.connect(handle.db_path)
    with conn:
        conn.execute(
            "UPDATE decisions SET satisfied = 1, label_source = 'user', labelled = ? WHERE id = ?",
            [time.time(), decision],
        )
    conn.close()
    again = start_daemon(home, models_dir, config)
    try:
        after = again.client().status()["routing"]
        assert after["pending_labels"] == 0, "the stored label was not learned: its prediction still waits"
        learned = sum(after["labels"].values()) - sum(before["labels"].values())
        assert learned == 1, (before["labels"], after["labels"])
        assert f"(decisions {decision})" in again.log()
    finally:
        again.stop()
    third = start_daemon(home, models_dir, config)  # learned once: saved, not learned again at each start
    try:
        assert third.client().status()["routing"]["labels"] == after["labels"]
    finally:
        third.stop()
