"""Review 37: the concurrent turn path (the acceptance beside the prompt's reading, the gate, the record's
begin and completion, the frames a client sees), with kills.

Found and mended here: an accepted turn whose record could not be completed (another process holding the
decision log's lock, a full disk) was told ``record_not_committed`` in an error frame without its
``decision``; and a cloud turn cancelled before its call (its client gone, the stop's grace over, while its
record waited for the log's lock) had the call made all the same, for nobody.

Then a property: a real daemon (the embedded model; the loopback cloud behind the fault proxy, which fails,
cuts and stalls some calls) serves a stream of mixed turns from several raw ZeroMQ clients at once (forced
local in dialogues whose KV states are parked, forced cloud, routed, and turns whose client leaves after
the ``decision`` frame or the first text), and is killed with SIGKILL at seeded moments, then started again
on the same state. Each client keeps every frame of every request it sent, so what the clients saw and
what the decision log holds are held against each other turn by turn (docs/reliability.md):

- frames come in the protocol's order: no text before the ``decision``, one ``decision`` at most, nothing
  after the last frame, which names the decision of an accepted turn;
- a turn whose client saw its ``decision`` has exactly one record, under that id, for that request; one
  whose client saw ``done`` is completed with that outcome, one that saw an ``error`` after its decision
  ends ``error`` or ``cancelled``, and one the kill cut is ``interrupted`` (or completed, where the kill
  only cut its last frames), a cloud call it may have made still counted;
- a turn refused before its decision has no record, and no record names a request nobody sent.
"""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from locod.client import Client
from locod.protocol import (
    LAST_FRAMES,
    ChatOptions,
    ChatRequest,
    DecisionFrame,
    DeltaFrame,
    DoneFrame,
    ErrorFrame,
    Frame,
    decode_frame,
    encode_request,
)

from .conftest import SECRET, Context, cloud_config, start_daemon, wait_for
from .faultproxy import Fault, FaultProxy
from .test_attacks24 import pending


def dealer(ctx: Context, endpoint: str) -> zmq.Socket[bytes]:
    """A raw client connection: every frame it gets is the test's to read, errors included."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def colour(request_id: str, **options: Any) -> ChatRequest:
    return ChatRequest(request_id, [{"role": "user", "content": "Name a colour."}], options=ChatOptions(**options))


def frames_until(sock: zmq.Socket[bytes], done: Any, proc: subprocess.Popen[bytes]) -> list[Frame]:
    """A raw client's frames until ``done(frames)`` (or the daemon exits)."""
    frames: list[Frame] = []
    while not done(frames):
        if sock.poll(100, zmq.POLLIN):
            frames.append(decode_frame(sock.recv())[1])
        else:
            assert proc.poll() is None, "the daemon exited"
    return frames


def test_an_accepted_turn_whose_record_cannot_be_completed_is_told_which_turn_failed(
    daemon_factory: Any, proxy: FaultProxy, ctx: Context
) -> None:
    """Another process holds the decision log's write lock (a sqlite3 shell in a transaction) when a cloud
    answer ends: the answer was given, its completion is held in memory, and the client is told
    ``record_not_committed``. That error frame came without ``decision``, where docs/protocol.md says the
    error of an accepted turn carries it: a client could not tell which answer's record was held back."""
    held = Fault("hold")
    proxy.set(held)
    handle = daemon_factory(cloud_config(proxy.base_url, timeout_s=60.0), extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    sock = dealer(ctx, handle.endpoint)
    sock.send(encode_request(colour("held-back", max_tokens=4)))
    accepted = frames_until(sock, lambda frames: frames, handle.proc)
    assert isinstance(accepted[0], DecisionFrame), accepted
    holder = sqlite3.connect(handle.db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # what `sqlite3 locod.db` then `BEGIN IMMEDIATE;` does
    try:
        held.released.set()  # the cloud answers now; the completion waits out the lock (10 s) and is held
        ended = frames_until(sock, lambda frames: frames and frames[-1].type in LAST_FRAMES, handle.proc)
    finally:
        holder.rollback()
        holder.close()
    error = ended[-1]
    assert isinstance(error, ErrorFrame) and error.code == "record_not_committed", ended
    assert error.decision == accepted[0].decision, error


def test_a_cloud_turn_cancelled_before_its_call_asks_no_cloud(
    daemon_factory: Any, proxy: FaultProxy, ctx: Context
) -> None:
    """A cloud turn's record waits for the decision log's lock (another process's transaction, up to 10 s);
    the daemon stops meanwhile with no grace left, which cancels the turn. Once the lock was let go the record
    was begun and the cloud call made all the same, for nobody (the turn leaves a call at once, but the
    endpoint had been asked, and bills for it). Now a turn cancelled before its call asks nothing: it ends
    ``cancelled`` and costs nothing."""
    config = cloud_config(proxy.base_url, timeout_s=60.0)
    config["daemon"] = {"shutdown_grace_s": 0.0}
    handle = daemon_factory(config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    Client(handle.endpoint).ask("warm", max_tokens=1)  # the first turn's one-off work is done
    asked = len(proxy.chat_requests())
    holder = sqlite3.connect(handle.db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        sock = dealer(ctx, handle.endpoint)  # kept open: its client stays, the stop is what cancels the turn
        sock.send(encode_request(colour("gone", max_tokens=4)))
        status = Client(handle.endpoint)
        wait_for(lambda: status.status()["queue"]["in_flight"], 60, "the turn to wait for the log's lock")
        handle.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "stopping: finishing 1 turns" in handle.log(), 60, "the stop")
        for _ in range(2):  # answered on passes of the loop after the one that began the stop, and cancelled it
            assert status.status()["stopping"]
    finally:
        holder.rollback()
        holder.close()
    assert handle.proc.wait(60) == 0
    assert len(proxy.chat_requests()) == asked, "a cloud call was made for a turn cancelled before it"
    rows = handle.rows("SELECT * FROM decisions WHERE request_id = 'gone'")
    assert [(r["outcome"], r["cost_usd"]) for r in rows] in ([], [("cancelled", 0.0)]), rows


# -- kill -9 under mixed turns, as a property ------------------------------------------------------


SEED = 37  # the kill moments, the turn mix and the faults; stated so that a failing run can be replayed
CYCLES = 8
WORKERS = 3
KINDS = ("local", "cloud", "routed", "leave_at_decision", "leave_at_text", "local")
DRAIN_S = 0.5  # after the daemon died, what reached a client's socket is still read this long


@dataclass
class Asked:
    """One request a client sent, and every frame it got back, in order."""

    request_id: str
    kind: str
    frames: list[Frame] = field(default_factory=list)
    left: bool = False  # its client closed the connection before the last frame: the turn is cancelled
    ids: set[str | None] = field(default_factory=set)  # the request ids its frames carried

    @property
    def decision(self) -> int | None:
        return next((f.decision for f in self.frames if isinstance(f, DecisionFrame)), None)

    @property
    def last(self) -> Frame | None:
        return self.frames[-1] if self.frames and self.frames[-1].type in LAST_FRAMES else None


@dataclass
class Run:
    """Everything the clients of the whole run sent and saw."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    asked: list[Asked] = field(default_factory=list)
    failures: list[BaseException] = field(default_factory=list)  # a client thread's: its test fails

    def add(self, asked: Asked) -> None:
        with self.lock:
            self.asked.append(asked)


def request_of(kind: str, worker: int, cycle: int, turn: int) -> ChatRequest:
    """A turn of ``kind``: forced local ones continue the worker's dialogue (its KV state saved, parked and
    restored as the workers take turns), the rest are one-off."""
    force = {"local": "local", "cloud": "cloud", "leave_at_text": "local"}.get(kind)
    session = f"w{worker}" if force == "local" else None
    prompt = f"Worker {worker}, cycle {cycle}, turn {turn}: name a colour."
    options = ChatOptions(max_tokens=6, force=force, temperature=0.0, seed=turn)
    return ChatRequest(uuid.uuid4().hex[:16], [{"role": "user", "content": prompt}], session, options=options)


def one_turn(ctx: Context, endpoint: str, asked: Asked, request: ChatRequest, dead: Any) -> None:
    """Send ``request`` on a connection of its own and read its frames until the last, until the client
    leaves (closing the connection, which cancels the turn), or until the daemon has died and nothing more
    came for ``DRAIN_S``."""
    sock = dealer(ctx, endpoint)
    try:
        sock.send(encode_request(request))
        quiet_since: float | None = None
        while asked.last is None:
            if not sock.poll(100, zmq.POLLIN):
                if dead():
                    quiet_since = quiet_since or time.monotonic()
                    if time.monotonic() - quiet_since > DRAIN_S:
                        return
                continue
            rid, frame = decode_frame(sock.recv())
            asked.frames.append(frame)
            asked.ids.add(rid)
            if (asked.kind == "leave_at_decision" and isinstance(frame, DecisionFrame)) or (
                asked.kind == "leave_at_text" and isinstance(frame, DeltaFrame)
            ):
                asked.left = frame.type not in LAST_FRAMES
                return
    finally:
        sock.close(linger=0)


def client_turns(endpoint: str, run: Run, worker: int, cycle: int, stop: threading.Event, dead: Any) -> None:
    """One client's turns, one after another, until the test stops it or the daemon dies under it."""
    rng = random.Random(SEED * 1000 + cycle * 10 + worker)
    ctx: Context = zmq.Context()
    try:
        for turn in range(1000):
            if stop.is_set() or dead():
                return
            kind = rng.choice(KINDS)
            request = request_of(kind, worker, cycle, turn)
            asked = Asked(request.id, kind)
            run.add(asked)
            one_turn(ctx, endpoint, asked, request, dead)
    except BaseException as exc:  # said by the test's own thread
        run.failures.append(exc)
    finally:
        ctx.destroy(linger=0)


def faults(rng: random.Random) -> list[Fault]:
    """What the cloud does to the calls of one cycle, in order: most pass; some fail past the retry (a
    fallback), are refused outright, are cut after a few chunks, or stall past the timeout."""
    made = (
        lambda: Fault(times=3),
        lambda: Fault("status", 500, times=2),
        lambda: Fault("status", 400, times=1),
        lambda: Fault("cut", cut_after_chunks=2, times=1),
        lambda: Fault("delay", delay_s=4.0, times=1),
    )
    return [rng.choice(made)() for _ in range(30)]


def check_order(asked: Asked) -> None:
    """The protocol's order of one request's frames: text only after its decision, one decision, nothing
    after the last frame, and a last frame that names the decision it ends."""
    assert asked.ids <= {asked.request_id}, f"frames of another request on its connection: {asked}"
    seen_decision = False
    for i, frame in enumerate(asked.frames):
        assert frame.type not in LAST_FRAMES or i == len(asked.frames) - 1, f"frames after the last: {asked}"
        if isinstance(frame, DecisionFrame):
            assert not seen_decision, f"two decision frames: {asked}"
            seen_decision = True
        elif frame.type in ("delta", "fallback", "escalated"):
            assert seen_decision, f"{frame.type} before the decision frame: {asked}"
        elif frame.type == "queued":
            assert not seen_decision, f"queued after the decision frame: {asked}"
    last = asked.last
    if isinstance(last, DoneFrame):
        assert last.decision == asked.decision, asked
    if isinstance(last, ErrorFrame) and seen_decision:
        assert last.decision == asked.decision, f"an accepted turn's error frame names no decision: {asked}"


def check_record(asked: Asked, row: dict[str, Any]) -> None:
    """The record of a turn whose client saw its decision says how the turn ended, as the client saw it."""
    assert row["request_id"] == asked.request_id, (asked, row)
    last = asked.last
    if isinstance(last, DoneFrame):
        assert row["outcome"] == last.outcome, (asked, row)
    elif isinstance(last, ErrorFrame):
        assert row["outcome"] == ("cancelled" if last.code == "cancelled" else "error"), (asked, row)
    elif asked.left:  # cancelled, unless it ended before the daemon saw the client go, or the kill came first
        assert row["outcome"] in ("cancelled", "ok", "fallback", "escalated", "error", "interrupted"), (asked, row)
    else:  # the kill cut it; or it ended and the kill cut its last frame on the way
        assert row["outcome"] != "pending", (asked, row)
    if row["outcome"] == "interrupted":
        assert row["error"] == "daemon stopped during the turn" and row["finished"], row
        escalating = row["confidence"] is not None and not json.loads(row["confidence"])["kept"]
        if row["location"] == "cloud" or escalating:  # a call may have been made: it stays counted against the cap
            assert row["cost_usd"] > 0 and row["cost_estimated"] == 1, row


def test_kill_9_under_mixed_turns_keeps_every_accepted_turn_as_its_client_saw_it(
    tmp_path: Path, models_dir: Path, proxy: FaultProxy
) -> None:
    rng = random.Random(SEED)
    home = tmp_path / "killed"
    db = home / "state" / "locod.db"
    config = cloud_config(proxy.base_url, mode="auto", timeout_s=3.0, max_retries=1, daily_cap_usd=10.0)
    config["cloud"]["breaker_failures"] = 1000  # the faults must reach the turns, not an open breaker
    # A tiny dialogue cache with a disk park: the workers' dialogues are saved, parked and restored as they
    # take turns, so kills land among those writes too.
    config["local"] = {"max_tokens": 6, "cache_mb": 1, "cache_disk_mb": 16}
    env = {"LOCOD_CLOUD_API_KEY": SECRET}
    run = Run()
    interrupted_total = 0
    for cycle in range(CYCLES):
        with proxy.lock:
            proxy.faults = faults(rng)
        left = pending(db)
        handle = start_daemon(home, models_dir, config, extra_env=env)
        stop = threading.Event()
        threads: list[threading.Thread] = []
        begun = len(run.asked)
        try:
            status = Client(handle.endpoint).status()
            assert status["interrupted_at_start"] == left, (status["interrupted_at_start"], left)
            interrupted_total += left
            dead = _dead(handle.proc)
            threads = [
                threading.Thread(target=client_turns, args=(handle.endpoint, run, w, cycle, stop, dead))
                for w in range(WORKERS)
            ]
            for t in threads:
                t.start()
            kill_moment(rng, run, begun)
        finally:  # killed whatever happens: a failed wait must not leave this cycle's daemon running
            handle.proc.send_signal(signal.SIGKILL)
            handle.proc.wait()
            stop.set()
        for t in threads:
            t.join(30)
            assert not t.is_alive(), "a client still waits on a killed daemon"
        assert not run.failures, run.failures
    left = pending(db)
    final = start_daemon(home, models_dir, config, extra_env=env)
    try:
        assert Client(final.endpoint).status()["interrupted_at_start"] == left
        rows = final.rows()
        assert final.rows("PRAGMA integrity_check")[0]["integrity_check"] == "ok"
        assert Client(final.endpoint).ask("after the kills", force="local", max_tokens=2).done.outcome == "ok"
    finally:
        final.stop()
    sent = {a.request_id for a in run.asked}
    assert not [r for r in rows if r["request_id"] not in sent], "a record of a request no client sent"
    by_id = {r["id"]: r for r in rows}
    by_request = {r["request_id"]: r for r in rows}
    assert len(by_request) == len(rows), "a turn recorded twice"
    accepted = 0
    for asked in run.asked:
        check_order(asked)
        decision = asked.decision
        if decision is None:
            # refused, or the kill came before its decision reached the client: a record, if any, was cut
            row = by_request.get(asked.request_id)
            assert row is None or (asked.last is None and row["outcome"] != "pending"), (asked, row)
            continue
        accepted += 1
        assert decision in by_id, f"a turn whose decision frame arrived has no record: {asked}"
        check_record(asked, by_id[decision])
    assert not [r for r in rows if r["outcome"] == "pending"]
    kinds = {a.kind for a in run.asked if isinstance(a.last, DoneFrame)}
    assert {"local", "cloud"} <= kinds, f"the mix did not run: {kinds}"
    assert accepted > 0 and interrupted_total + left > 0, (accepted, interrupted_total, left)


def kill_moment(rng: random.Random, run: Run, begun: int) -> None:
    """Wait for a seeded moment of the cycle begun when ``run`` held ``begun`` requests: at once (acceptances,
    prompts read, states restored), once a turn is accepted, or once one to three have ended; then a seeded
    moment more. Counted in turns, not seconds, so that a slow machine moves the kills, not what they cut."""
    ended = rng.choice((0, 0, 1, 2, 3))
    if ended:
        wait_for(lambda: sum(a.last is not None for a in run.asked[begun:]) >= ended, 300, f"{ended} turns to end")
    elif rng.random() < 0.5:
        wait_for(lambda: any(a.decision is not None for a in run.asked[begun:]), 300, "a turn to be accepted")
    time.sleep(rng.uniform(0.0, 1.5))


def _dead(proc: subprocess.Popen[bytes]) -> Any:
    return lambda: proc.poll() is not None
