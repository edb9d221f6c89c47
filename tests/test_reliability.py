"""Reliability and security under hostile input, crashes, load, access attempts and disk trouble, against
the real daemon. The long versions with figures are scripts/stress.py (docs/reliability.md)."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from locod.client import Client, new_id
from locod.daemon.answer_digests import answer_digest
from locod.daemon.records import DecisionLog, DecisionRecord, Outcome
from locod.errors import LocodError, RequestError, StorageError
from locod.protocol import Attachment, ChatOptions, ChatRequest, DoneFrame

from .conftest import DaemonHandle, fill_disk, free_port, start_daemon, wait_for
from .faultproxy import Fault, FaultProxy
from .hostile import swapping
from .test_cloud import cloud_config

LIMIT = 256 * 1024
NOBODY = 65534  # another user's uid (the tests run as root)

# -- protocol fuzzing --------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)
ops = st.sampled_from(["chat", "feedback", "status", "decisions", "ping", "reload", "nope", "", None, 3])
bad_attachment = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["image", "document", "video", 7]),
        "name": st.text(max_size=30),
        "data": st.one_of(st.text(max_size=200), st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode())),
    }
)
hostile_request = st.fixed_dictionaries(
    {"v": st.sampled_from([1, 1, 1, 2, "1", None]), "id": st.text(min_size=1, max_size=20), "op": ops},
    optional={
        "prompt": st.one_of(st.text(max_size=200), json_values, st.just("x" * (LIMIT + 1))),
        "messages": st.one_of(
            json_values,
            st.lists(st.fixed_dictionaries({"role": st.text(max_size=9), "content": json_values}), max_size=3),
        ),
        "attachments": st.one_of(json_values, st.lists(bad_attachment, max_size=3)),
        "options": st.one_of(
            json_values, st.fixed_dictionaries({"max_tokens": st.integers(-5, 2), "temperature": json_values})
        ),
        "decision": json_values,
        "satisfied": json_values,
        "limit": json_values,
        "session": json_values,
    },
)
classic = st.one_of(
    st.binary(max_size=300),  # random bytes
    json_values.map(lambda v: json.dumps(v).encode()),
    hostile_request.map(lambda v: json.dumps(v).encode()),
    st.integers(100, 3000).map(lambda depth: b"[" * depth + b"]" * depth),  # deep nesting
)
# Issue #17's classes. @HOME@ is the fuzz home: a FIFO, a directory, a symlink out, a file
# that a thread keeps swapping with a symlink out (renameat2), a file in another user's directory, and
# paths that are not paths. Chats forced to a cloud that trickles, never ends or floods (the fault is
# drawn per batch). Values that used to end as `internal`.
HOSTILE_PATHS = [f"@HOME@/{p}" for p in ("pipe", "sub", "link.md", "swapped.md", "notes.md", "a\x00b")]
HOSTILE_PATHS += ["@HOME@/../others/theirs.md", "@HOME@/others-link/theirs.md", "/dev/zero", "/proc/self/fd/0"]
path_chat = st.fixed_dictionaries(
    {
        "v": st.just(1),
        "id": st.text(min_size=1, max_size=8),
        "op": st.just("chat"),
        "prompt": st.text(min_size=1, max_size=40),
        "attachments": st.lists(
            st.fixed_dictionaries({"kind": st.just("document"), "path": st.sampled_from(HOSTILE_PATHS)}),
            min_size=1,
            max_size=2,
        ),
    }
)
cloud_chat = st.fixed_dictionaries(
    {
        "v": st.just(1),
        "id": st.text(min_size=1, max_size=8),
        "op": st.just("chat"),
        "prompt": st.text(min_size=1, max_size=40),
        "options": st.fixed_dictionaries({"force": st.just("cloud"), "max_tokens": st.integers(1, 5)}),
    }
)
odd_values = st.one_of(
    st.builds(lambda t: {"v": 1, "id": "s", "op": "chat", "prompt": t + "\ud800"}, st.text(max_size=20)),
    st.builds(lambda t: {"v": 1, "id": "s", "op": "ping", "x": ["\udc00" + t]}, st.text(max_size=20)),
    st.integers(2**63, 2**80).map(lambda n: {"v": 1, "id": "f", "op": "feedback", "decision": n, "satisfied": True}),
    st.integers(2**63, 2**80).map(lambda n: {"v": 1, "id": "c", "op": "chat", "prompt": "x", "options": {"seed": -n}}),
)
huge_integer = st.integers(4400, 6000).map(lambda n: b'{"v": 1, "id": "i", "op": "ping", "n": ' + b"7" * n + b"}")
rare = st.one_of(
    path_chat.map(lambda v: json.dumps(v).encode()),
    odd_values.map(lambda v: json.dumps(v).encode()),
    huge_integer,
)
# One message in ten is of the new classes, one in a hundred a hostile cloud turn (each costs a deadline).
CLASSES = {"classic": classic, "rare": rare, "cloud": cloud_chat.map(lambda v: json.dumps(v).encode())}
messages = st.sampled_from(["classic"] * 90 + ["rare"] * 9 + ["cloud"]).flatmap(CLASSES.__getitem__)
CLOUD_FAULTS = [
    Fault("trickle", delay_s=0.2),
    Fault("endless"),
    Fault("huge_event", size=2 << 20),
    Fault("no_newline", size=64 << 20),
    Fault("status", status=400),
    Fault("status", status=503),
]
OUTSIDE = "outside the allow list " * 40


def _hostile_home(home: Path) -> None:
    allowed = home / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "notes.md").write_text("The boat is blue.")
    (allowed / "swapped.md").write_text("Swap me.")
    os.mkfifo(allowed / "pipe")
    (home / "outside.md").write_text(OUTSIDE)
    (allowed / "link.md").symlink_to(home / "outside.md")
    (allowed / "swap-link").symlink_to(home / "outside.md")
    others = home / "others"
    others.mkdir()
    (others / "theirs.md").write_text("another user's notes")
    os.chown(others, NOBODY, NOBODY)
    (allowed / "others-link").symlink_to(others)


@pytest.fixture(scope="module")
def fuzz_daemon(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> Iterator[tuple[DaemonHandle, FaultProxy]]:
    home = tmp_path_factory.mktemp("fuzz")
    _hostile_home(home)
    cloud = FaultProxy("http://127.0.0.1:9").start()  # hostile streams only: nothing behind it
    config = cloud_config(cloud.base_url, mode="local", max_retries=0, breaker_failures=1000)
    config["cloud"].update(timeout_s=1.0, deadline_s=1.0, max_answer_bytes=1 << 20, max_event_bytes=64 << 10)
    config.update(
        daemon={"max_message_bytes": LIMIT, "max_queued_bytes": 1 << 20},
        local={"max_tokens": 1},
        paths={"allow_dirs": [str(home / "allowed")]},
    )
    handle = start_daemon(home / "d", models_dir, config)
    yield handle, cloud
    handle.stop()
    cloud.stop()


def test_ten_thousand_hostile_messages(fuzz_daemon: tuple[DaemonHandle, FaultProxy]) -> None:
    fuzz_daemon, cloud = fuzz_daemon
    home = fuzz_daemon.home.parent
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(fuzz_daemon.endpoint)
    process = psutil.Process(fuzz_daemon.proc.pid)
    counts = {"sent": 0, "errors": 0, "valid": 0}
    rss: list[int] = []
    silent: list[zmq.Socket[bytes]] = []  # clients that send and never read

    def exchange(frame: bytes) -> list[dict[str, Any]]:
        sock.send(frame)
        replies = []
        while True:
            assert sock.poll(30_000), f"no reply to {frame[:80]!r}"
            reply = json.loads(sock.recv())
            replies.append(reply)
            if reply["type"] in ("error", "result", "done"):
                return replies

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(st.lists(messages, min_size=49, max_size=49), st.sampled_from(CLOUD_FAULTS))
    def batch(frames: list[bytes], fault: Fault) -> None:
        cloud.set(dataclasses.replace(fault))
        mute = zmq.Context.instance().socket(zmq.DEALER)
        mute.setsockopt(zmq.LINGER, 0)
        mute.setsockopt(zmq.RCVHWM, 1)
        mute.connect(fuzz_daemon.endpoint)
        for i in range(5):
            mute.send(json.dumps({"v": 1, "id": f"m{i}", "op": "decisions", "limit": 1000}).encode())
        silent.append(mute)
        if len(silent) > 10:
            silent.pop(0).close()
        for frame in frames:
            exchange(frame.replace(b"@HOME@", str(home / "allowed").encode()))
            counts["sent"] += 1
        pong = exchange(json.dumps({"v": 1, "id": "valid", "op": "ping"}).encode())  # interleaved valid request
        assert pong[-1]["type"] == "result" and pong[-1]["data"]["pong"] is True
        counts["valid"] += 1
        if counts["valid"] % 20 == 1:  # a valid attachment now and then: the drawn ones may all be hostile
            notes = {"kind": "document", "path": str(home / "allowed" / "notes.md")}
            read = exchange(
                json.dumps({"v": 1, "id": "doc", "op": "chat", "prompt": "Colour?", "attachments": [notes]}).encode()
            )
            assert read[-1]["type"] == "done"
        rss.append(process.memory_info().rss)

    with swapping(home / "allowed" / "swapped.md", home / "allowed" / "swap-link") as swaps:
        batch()
    sock.close()
    for mute in silent:
        mute.close()
    assert swaps[0] > 0
    assert counts["sent"] + counts["valid"] >= 10_000
    assert fuzz_daemon.proc.poll() is None
    ok = Client(fuzz_daemon.endpoint).ask("Hello", max_tokens=2)
    assert ok.done.outcome == "ok"
    # memory bounded: the second half of the run does not keep growing
    half = len(rss) // 2
    assert max(rss[half:]) - max(rss[:half]) < 64 * 2**20, (rss[0], rss[-1])
    assert fuzz_daemon.rows("PRAGMA integrity_check")[0]["integrity_check"] == "ok"
    rows = fuzz_daemon.rows()
    offered = [a for row in rows for a in json.loads(row["attachments_offered"])]
    assert offered and len(OUTSIDE) not in {a["bytes"] for a in offered}  # nothing outside was ever read
    assert not [r for r in rows if r["outcome"] == "pending"]


# -- crash consistency -------------------------------------------------------------------------------


def test_kill_9_during_turns_loses_no_acknowledged_record(tmp_path: Path, models_dir: Path) -> None:
    rng = random.Random(20)
    acknowledged: set[int] = set()
    home = tmp_path / "crashy"
    config = {"local": {"max_tokens": 30}, "routing": {"explore_c": 0.0}}
    for cycle in range(20):  # kill -9 cycles
        handle = start_daemon(home, models_dir, config)
        done_ids: list[int] = []

        def talk(n: int, handle: DaemonHandle = handle, done_ids: list[int] = done_ids) -> None:
            try:
                # The client notices the kill by its liveness check (a second of silence, then a refused
                # connect); no short silence limit, which a turn waiting its turn on a slow machine can hit.
                with Client(handle.endpoint, turn_timeout_s=120) as client:
                    for i in range(3):
                        done_ids.append(client.ask(f"client {n} turn {i}", session=f"s{n}").done.decision)
            except LocodError:
                pass  # the daemon died under us: expected

        threads = [threading.Thread(target=talk, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        try:
            if cycle % 4 == 0:  # some kills come after a turn has ended, however slow the machine
                wait_for(lambda done_ids=done_ids: done_ids, 120, "a turn to end before the kill")
            time.sleep(rng.uniform(0.05, 1.5))
        finally:  # killed whatever happens: a failed wait must not leave this cycle's daemon running
            handle.proc.send_signal(signal.SIGKILL)
            handle.proc.wait()
        for t in threads:
            t.join(30)
        acknowledged.update(done_ids)
    final = start_daemon(home, models_dir, config)
    try:
        assert final.rows("PRAGMA integrity_check")[0]["integrity_check"] == "ok"
        rows = {r["id"]: r for r in final.rows()}
        assert acknowledged <= set(rows), "a turn whose done frame was received has no record"
        assert all(rows[i]["outcome"] == "ok" for i in acknowledged)
        assert not [r for r in rows.values() if r["outcome"] == "pending"]
        status = Client(final.endpoint).status()
        assert status["routing"]["turns"] >= len(acknowledged) - 20  # settled state survived (atomic file)
        assert not list((home / "state").glob("messplus.npz.bad-*")), "a half-written state file was found"
        assert Client(final.endpoint).ask("after the storm", max_tokens=2).done.outcome == "ok"
    finally:
        final.stop()
    assert len(acknowledged) > 0


# -- load ----------------------------------------------------------------------------------------------


def test_fifty_concurrent_clients_are_all_served_fairly(daemon_factory: Any) -> None:
    handle = daemon_factory({"local": {"max_tokens": 2}, "routing": {"explore_c": 0.0}})
    served: dict[int, int] = {}
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            with Client(handle.endpoint, turn_timeout_s=120) as c:
                for i in range(3):
                    if n % 5 == 0:
                        c.status()
                    if n % 7 == 0:  # a slow reader: takes its frames late
                        request = ChatRequest(new_id(), [{"role": "user", "content": f"slow {n}.{i}"}])
                        rid = c.send(dataclasses.replace(request, options=ChatOptions(max_tokens=2)))
                        time.sleep(0.3)
                        frames = list(c.frames(rid, 120_000))
                        assert isinstance(frames[-1], DoneFrame)
                        decision = frames[-1].decision
                    else:
                        decision = c.ask(f"client {n} turn {i}", max_tokens=2).done.decision
                    if n % 3 == 0:
                        c.feedback(decision, n % 2 == 0)
                    served[n] = served.get(n, 0) + 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[:3]
    assert served == {n: 3 for n in range(50)}
    assert len(handle.rows()) == 150
    assert handle.client().status()["queue"]["in_flight"] == 0


# -- access --------------------------------------------------------------------------------------------


def test_tcp_endpoint_requires_the_shared_secret(daemon_factory: Any, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret-token\n")
    os.chmod(secret, 0o600)
    port = free_port()
    handle = daemon_factory({"daemon": {"tcp": f"tcp://127.0.0.1:{port}", "tcp_secret_file": str(secret)}})
    with pytest.raises(RequestError) as info:
        Client(f"tcp://127.0.0.1:{port}").ping()
    assert info.value.code == "unauthorized"
    assert Client(f"tcp://127.0.0.1:{port}", secret="s3cret-token").ping()["pong"]
    assert handle.client().ping()["pong"]  # the ipc socket needs no secret: its file modes guard it


@pytest.mark.parametrize(
    ("text", "mode", "message"),
    [("  \n\t\n", 0o600, "is empty (or only whitespace)"), ("s3cret-token\n", 0o644, "readable by group or others")],
)
def test_tcp_secret_file_follows_the_key_file_rules(
    tmp_path: Path, models_dir: Path, text: str, mode: int, message: str
) -> None:
    """A blank secret would let requests without one through; a 0644 one has leaked already."""
    secret = tmp_path / "secret"
    secret.write_text(text)
    os.chmod(secret, mode)
    config = {"daemon": {"tcp": f"tcp://127.0.0.1:{free_port()}", "tcp_secret_file": str(secret)}}
    handle = start_daemon(tmp_path / "d", models_dir, config, wait=False)
    try:
        assert handle.proc.wait(60) == 2
    finally:
        handle.stop()
    assert f"daemon.tcp_secret_file {secret}" in handle.log() and message in handle.log()


def test_tcp_beyond_loopback_without_secret_refuses_to_start(tmp_path: Path, models_dir: Path) -> None:
    handle = start_daemon(tmp_path, models_dir, {"daemon": {"tcp": f"tcp://0.0.0.0:{free_port()}"}}, wait=False)
    assert handle.proc.wait(60) == 2  # a configuration error, found when the file is read
    assert "beyond loopback: set daemon.tcp_secret_file" in handle.log()


def test_paths_outside_the_allow_list_are_refused(daemon_factory: Any, tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "notes.md").write_text("The boat is blue.")
    outside = tmp_path / "outside.md"
    outside.write_text("secret outside the allow list")
    (allowed / "link.md").symlink_to(outside)
    handle = daemon_factory({"paths": {"allow_dirs": [str(allowed)]}})
    client = handle.client()
    ok = client.ask(
        "What colour is the boat?",
        attachments=[Attachment("document", "notes.md", path=str(allowed / "notes.md"))],
        max_tokens=2,
    )
    assert ok.done.outcome == "ok"
    for path in (str(allowed / ".." / "outside.md"), str(allowed / "link.md"), "/etc/shadow"):
        with pytest.raises(RequestError) as info:
            client.ask("read", attachments=[Attachment("document", "x", path=path)], max_tokens=2)
        assert info.value.code == "path_not_allowed", path
    assert len(handle.rows()) == 1


# -- disk trouble --------------------------------------------------------------------------------------


def test_full_disk_refuses_turns_clearly_and_keeps_serving(tmp_path: Path, models_dir: Path, small_disk: Path) -> None:
    handle = start_daemon(
        tmp_path / "d", models_dir, {"log": {"prompts": True}}, extra_env={"LOCOD_STATE_DIR": str(small_disk)}
    )
    try:
        client = handle.client()
        assert client.ask("before the disk fills", max_tokens=2).done.outcome == "ok"
        filler = small_disk / "filler"
        fill_disk(filler)
        refusal, seen = None, []
        for i in range(200):  # the WAL's spare pages fill first
            seen = []
            try:
                for frame in client.chat("word " * 700 + str(i), max_tokens=2):
                    seen.append(frame.type)
            except LocodError as exc:
                if exc.code == "record_not_committed":  # the disk filled at this turn's completion, after
                    continue  # its begin was committed: the next turn's begin meets the full disk
                refusal = exc
                break
        assert isinstance(refusal, StorageError) and refusal.code == "disk_full", refusal
        assert "delta" not in seen or seen[0] == "decision"  # never a word of an answer not accepted
        assert "full" in refusal.message
        assert client.ping()["pong"] and client.status()["pid"] == handle.proc.pid  # still serving
        filler.unlink()
        assert client.ask("after", max_tokens=2).done.outcome == "ok"
    finally:
        handle.stop()


def test_a_record_the_full_disk_held_back_is_completed_once_it_can_be_written(
    tmp_path: Path, models_dir: Path, small_disk: Path
) -> None:
    """Disk full between a turn's decision and its end: the client is told its record is not committed
    yet; once space is back the next write completes it (not left pending, not called interrupted)."""
    handle = start_daemon(tmp_path / "d", models_dir, {}, extra_env={"LOCOD_STATE_DIR": str(small_disk)})
    filler = small_disk / "filler"
    try:
        client = handle.client()
        assert client.ask("before the disk fills", max_tokens=2).done.outcome == "ok"
        held: LocodError | None = None
        for i in range(20):  # a completion written into the WAL's spare room succeeds: try again
            frames = client.chat(f"Write a long essay about the ocean, part {i}.", max_tokens=24)
            try:
                for frame in frames:
                    if frame.type == "decision":
                        fill_disk(filler)
            except LocodError as exc:
                held = exc
                break
            filler.unlink()
        assert held is not None and held.code == "record_not_committed", held
        assert "the answer was given but its record is not committed yet" in held.message
        pending = [row for row in _rows(small_disk) if row["outcome"] == "pending"]
        assert len(pending) == 1
        filler.unlink()
        assert client.ask("after", max_tokens=2).done.outcome == "ok"  # its write completes the held one
        row = next(r for r in _rows(small_disk) if r["id"] == pending[0]["id"])
        assert row["outcome"] == "ok" and row["tokens_out"] > 0 and row["error"] is None
        assert "completed 1 held-back record(s)" in handle.log()
    finally:
        filler.unlink(missing_ok=True)
        handle.stop()
    restarted = start_daemon(tmp_path / "d", models_dir, {}, extra_env={"LOCOD_STATE_DIR": str(small_disk)})
    restarted.stop()
    assert not [row for row in _rows(small_disk) if row["outcome"] in ("pending", "interrupted")]


def test_an_answer_made_from_private_material_is_known_while_its_record_is_held_back(small_disk: Path) -> None:
    """The digest that keeps a private answer from the cloud when a client sends it back is found while a
    full disk still holds its record's completion in memory, not only once it is written."""
    log = DecisionLog(small_disk / "locod.db")
    record = DecisionRecord("s", 0, "r", "0" * 64, 5, None, "chat", "local", "m", "test")
    decision = log.begin(record)
    digest = answer_digest("The vault code is ZX-4471-QQ.")
    filler = small_disk / "filler"
    try:
        fill_disk(filler)
        with pytest.raises(StorageError) as info:
            log.finish(decision, Outcome("ok", "local", "m", private_answer=digest))
        assert info.value.code == "record_not_committed"
        assert log.private_answers([digest, answer_digest("something else")]) == {digest}
    finally:
        filler.unlink(missing_ok=True)
    log.write_unwritten()
    assert log.private_answers([digest]) == {digest}  # from the log itself now
    log.close()


def _rows(state_dir: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(state_dir / "locod.db")
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM decisions ORDER BY id")]
    finally:
        conn.close()


def test_read_only_state_is_a_clear_start_error(tmp_path: Path, models_dir: Path, small_disk: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    handle = start_daemon(tmp_path / "d", models_dir, {}, extra_env={"LOCOD_STATE_DIR": str(small_disk)}, wait=False)
    assert handle.proc.wait(60) == 4
    log = handle.log()
    assert "Read-only file system" in log or "readonly" in log.lower()
    assert "Traceback" not in log
