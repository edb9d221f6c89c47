"""Attacks from issue #17, each against the real daemon: FIFOs and symlink races on the attachment
allow-list, squatted runtime directories, clients that never read, request-caused 4xx, hostile cloud
streams, oversized prompts, and values that used to end as `internal`."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq

from locod.client import Client
from locod.daemon.ownership import make_private_dir
from locod.errors import PromptTooLong, RequestError, StorageError, UnsafeSocket
from locod.protocol import Attachment, DeltaFrame

from .conftest import DaemonHandle, start_daemon
from .faultproxy import Fault, FaultProxy
from .hostile import outcomes, swapping
from .test_cloud import cloud_config

NOBODY = 65534  # another user: the daemon and the tests run as root here
OUTSIDE_TEXT = "THE-OUTSIDE-SECRET " * 50


def raw_socket(handle: DaemonHandle, rcvhwm: int = 1000) -> zmq.Socket[bytes]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, rcvhwm)
    sock.connect(handle.endpoint)
    return sock


def request(op: str, rid: str, **fields: Any) -> bytes:
    return json.dumps({"v": 1, "id": rid, "op": op, **fields}).encode()


# -- attachments: FIFOs, devices, symlink races ------------------------------------------------------


@pytest.fixture
def allowed(tmp_path: Path) -> Path:
    directory = tmp_path / "allowed"
    directory.mkdir()
    (directory / "notes.md").write_text("The boat is blue.")
    os.mkfifo(directory / "pipe")
    (directory / "sub").mkdir()
    (directory / "zero").symlink_to("/dev/zero")
    (tmp_path / "outside.md").write_text(OUTSIDE_TEXT)
    return directory


def test_fifo_and_other_non_regular_files_are_refused_without_blocking(daemon_factory: Any, allowed: Path) -> None:
    handle = daemon_factory({"paths": {"allow_dirs": [str(allowed)]}, "local": {"max_tokens": 2}})
    client = handle.client(turn_timeout_s=30)  # the old daemon blocked in open() for good
    for name, code in (("pipe", "bad_path"), ("sub", "bad_path"), ("zero", "path_not_allowed")):
        with pytest.raises(RequestError) as info:
            client.ask("read", attachments=[Attachment("document", "doc", path=str(allowed / name))])
        assert info.value.code == code, name
    assert (
        client.ask("read", attachments=[Attachment("document", "doc", path=str(allowed / "notes.md"))]).text is not None
    )
    assert handle.stop() == 0  # SIGTERM stops it: no worker is stuck


def test_one_client_cannot_hold_every_worker(daemon_factory: Any, allowed: Path) -> None:
    handle = daemon_factory({"daemon": {"max_turns_per_client": 2}, "local": {"max_tokens": 64}})
    sock = raw_socket(handle)
    for i in range(6):
        sock.send(request("chat", f"t{i}", prompt=f"Write a long story number {i}."))
    refused = 0
    for _ in range(200):  # bounded: six turns of at most a few frames each, or their refusals
        if not sock.poll(60_000):
            break
        frame = json.loads(sock.recv())
        if frame["type"] == "error":
            assert frame["code"] == "busy" and "has 2 turns in flight, at daemon.max_turns" in frame["message"]
            refused += 1
        if refused == 4:
            break
    assert refused == 4
    assert handle.client().ask("Hi", max_tokens=2).done.outcome == "ok"  # another client is served
    sock.close()


def test_symlink_swapped_in_during_the_check_never_reads_outside(daemon_factory: Any, allowed: Path) -> None:
    """One thread swaps an allowed file with a symlink to a file outside (renameat2 RENAME_EXCHANGE) as
    fast as it can, while turns name the allowed file: the outside file's bytes never reach a turn."""
    (allowed / "swap").symlink_to(allowed.parent / "outside.md")
    handle = daemon_factory({"paths": {"allow_dirs": [str(allowed)]}, "local": {"max_tokens": 1}})
    document = [Attachment("document", "doc", path=str(allowed / "notes.md"))]
    with swapping(allowed / "notes.md", allowed / "swap", max_s=300) as swaps:
        counts = outcomes(handle.client(), 120, "boat?", attachments=document)
    assert swaps[0] > 100 and set(counts) <= {"ok", "path_not_allowed"}, (swaps, counts)
    sizes = {a["bytes"] for row in handle.rows() for a in json.loads(row["attachments_offered"])}
    assert sizes <= {len("The boat is blue.")}, sizes  # never the outside file's


# -- the runtime directory and the socket's owner ----------------------------------------------------


@pytest.mark.parametrize("squatted", ["parent", "runtime"])
def test_runtime_directory_of_another_user_is_refused(tmp_path: Path, models_dir: Path, squatted: str) -> None:
    parent = tmp_path / "locod-0"
    runtime = parent / "locod"
    runtime.mkdir(parents=True)
    target = parent if squatted == "parent" else runtime
    os.chown(target, NOBODY, NOBODY)
    os.chmod(target, 0o777)
    handle = start_daemon(tmp_path / "d", models_dir, wait=False, extra_env={"LOCOD_RUNTIME_DIR": str(runtime)})
    try:
        assert handle.proc.wait(60) == 4
    finally:
        handle.stop()
    assert f"refusing {target}" in handle.log() and "Traceback" not in handle.log()
    assert os.stat(target).st_mode & 0o777 == 0o777  # not chmodded: it is not the daemon's
    assert not (runtime / "locod.sock").exists()


def test_client_sends_nothing_to_a_socket_another_user_owns(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    squatter = zmq.Context.instance().socket(zmq.ROUTER)
    squatter.setsockopt(zmq.LINGER, 0)
    squatter.bind(f"ipc://{run / 'locod.sock'}")
    try:
        os.chown(run / "locod.sock", NOBODY, NOBODY)
        with pytest.raises(UnsafeSocket):
            Client(f"ipc://{run / 'locod.sock'}", timeout_s=1, turn_timeout_s=2).ask("my private prompt")
        os.chown(run / "locod.sock", 0, 0)
        os.chown(run, NOBODY, NOBODY)
        with pytest.raises(UnsafeSocket):
            Client(f"ipc://{run / 'locod.sock'}", timeout_s=1, turn_timeout_s=2).ask("my private prompt")
        assert not squatter.poll(500), "the squatter received a request"
    finally:
        squatter.close()


# -- clients that never read -------------------------------------------------------------------------


@pytest.fixture
def many_records(tmp_path: Path, models_dir: Path) -> Iterator[DaemonHandle]:
    """A daemon whose log holds 1,000 records, so that `decisions limit=1000` is a large reply."""
    home = tmp_path / "d"
    first = start_daemon(home, models_dir, {"local": {"max_tokens": 2}})
    first.client().ask("Tell me about boats and their colours.", max_tokens=2)
    first.stop()
    conn = sqlite3.connect(home / "state" / "locod.db")
    columns = [r[1] for r in conn.execute("PRAGMA table_info(decisions)") if r[1] != "id"]
    listed = ", ".join(columns)
    for _ in range(999):
        conn.execute(f"INSERT INTO decisions ({listed}) SELECT {listed} FROM decisions WHERE id = 1")
    conn.commit()
    conn.close()
    handle = start_daemon(home, models_dir, {"daemon": {"max_queued_bytes": 4 << 20}, "local": {"max_tokens": 2}})
    yield handle
    handle.stop()


def test_client_that_never_reads_is_dropped_at_its_byte_bound(many_records: DaemonHandle) -> None:
    handle = many_records
    reply_bytes = len(json.dumps(handle.client().decisions(1000)))
    assert reply_bytes > 200_000  # the amplification: a 60-byte request, a reply this large
    process = psutil.Process(handle.proc.pid)
    before = process.memory_info().rss
    sock = raw_socket(handle, rcvhwm=1)  # its receive queue fills, then it reads nothing more
    for i in range(400):
        sock.send(request("decisions", f"d{i}", limit=1000))
    deadline = time.monotonic() + 120
    while "not reading its replies" not in handle.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "not reading its replies" in handle.log()
    assert handle.client().ping()["pong"]  # everyone else is still served
    grown = process.memory_info().rss - before
    # What may wait for it: its pipe (16 frames) and its backlog (4 MiB). 400 replies would be far more.
    assert grown < 16 * reply_bytes + (4 << 20) + (64 << 20), (grown, reply_bytes)
    assert grown < 400 * reply_bytes // 2
    sock.close()


# -- the cloud: request-caused 4xx and hostile streams -----------------------------------------------


def test_request_caused_4xx_does_not_open_the_breaker(daemon_factory: Any, proxy: FaultProxy) -> None:
    handle = daemon_factory(cloud_config(proxy.base_url, max_retries=0, breaker_failures=1))
    client = handle.client()
    for status in (400, 413, 422):
        proxy.set(Fault("status", status=status, times=1))
        result = client.ask("an oversized prompt", max_tokens=2)
        assert result.done.outcome == "fallback"
        assert client.status()["cloud"]["breaker"] == "closed", status
    proxy.set(Fault("status", status=500, times=1))  # the endpoint's own failure still counts
    assert client.ask("Hi", max_tokens=2).done.outcome == "fallback"
    assert client.status()["cloud"]["breaker"] == "open"


@pytest.fixture
def hostile_cloud() -> Iterator[FaultProxy]:
    """The proxy alone: hostile streams are made up by it, nothing is forwarded."""
    proxy = FaultProxy("http://127.0.0.1:9").start()
    yield proxy
    proxy.stop()


HOSTILE = {"timeout_s": 2.0, "deadline_s": 4.0, "max_answer_bytes": 1 << 20, "max_event_bytes": 64 << 10}


@pytest.mark.parametrize(
    ("fault", "cause"),
    [
        (Fault("trickle", delay_s=0.2), "cloud_deadline"),  # each byte resets a per-read timeout
        (Fault("huge_event", size=4 << 20), "cloud_answer_too_large"),
        (Fault("no_newline", size=256 << 20), "cloud_answer_too_large"),
    ],
)
def test_hostile_cloud_streams_are_cut_at_their_bounds(
    daemon_factory: Any, hostile_cloud: FaultProxy, fault: Fault, cause: str
) -> None:
    handle = daemon_factory(cloud_config(hostile_cloud.base_url, max_retries=0, **HOSTILE))
    hostile_cloud.set(fault)
    process = psutil.Process(handle.proc.pid)
    before = process.memory_info().rss
    result = handle.client(turn_timeout_s=120).ask("Say something.", max_tokens=4)
    assert result.fallback is not None and result.fallback.cause == cause and result.done.outcome == "fallback"
    assert all(len(f.text) <= HOSTILE["max_event_bytes"] for f in result.frames if isinstance(f, DeltaFrame))
    assert process.memory_info().rss - before < 128 << 20


def test_endless_stream_stops_at_max_tokens(daemon_factory: Any, hostile_cloud: FaultProxy) -> None:
    handle = daemon_factory(cloud_config(hostile_cloud.base_url, max_retries=0, **HOSTILE))
    hostile_cloud.set(Fault("endless"))
    result = handle.client(turn_timeout_s=120).ask("Count.", max_tokens=5)
    assert result.done.outcome == "ok" and result.done.location == "cloud"
    assert len([f for f in result.frames if isinstance(f, DeltaFrame)]) == 5


# -- oversized prompts and values that used to be `internal` -----------------------------------------


@pytest.mark.parametrize(
    ("prompt", "force", "message"),
    [
        ("word " * (3 << 20), None, "over daemon.max_prompt_chars (1000000)"),
        ("word " * 40_000, "local", "maximum context length is 2048 tokens, which hold at most 65536 bytes"),
    ],
)
def test_oversized_prompt_is_refused_by_size_unread(
    daemon_factory: Any, prompt: str, force: str | None, message: str
) -> None:
    handle = daemon_factory({"daemon": {"max_message_bytes": 32 << 20}})
    with pytest.raises(PromptTooLong) as info:
        handle.client().ask(prompt, force=force, max_tokens=2)
    assert message in info.value.message
    assert handle.rows() == []


def test_a_symlinked_runtime_directory_is_refused_as_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "run").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StorageError, match=r"it is a symlink \(to .*elsewhere\), not a directory"):
        make_private_dir(tmp_path / "run")
