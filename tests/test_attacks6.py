"""Round six of attacks on a running daemon: each test is one way in that broke, and now holds."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import zmq

from locod.errors import StorageError
from locod.protocol import ChatOptions, ChatRequest, encode_request

from .conftest import cloud_config, free_port, start_daemon, wait_for


def test_a_model_file_truncated_while_loaded_does_not_kill_the_daemon(tmp_path: Path, model_path: Path) -> None:
    """`cp` or a download over a loaded GGUF truncates it in place. A memory-mapped model then died of
    SIGBUS at its next token, taking every client and turn with it; a model read into memory answers on."""
    models = tmp_path / "models"
    models.mkdir()
    copy = models / model_path.name
    shutil.copyfile(model_path, copy)
    handle = start_daemon(tmp_path / "d", models)
    try:
        client = handle.client()
        assert client.ask("Say hi.", max_tokens=4).done is not None
        with copy.open("r+b") as f:
            f.truncate(1 << 20)
        assert client.ask("Say hello.", max_tokens=4).done is not None
        assert client.ping()["pong"] and handle.proc.poll() is None
    finally:
        handle.stop()


def test_a_request_id_cannot_forge_a_log_line(daemon_factory: Any) -> None:
    """Log lines quote request ids (any string up to 200 characters): an id with a newline, on a turn
    whose cloud is down, wrote a line of the client's choosing into the owner's log. Now it is escaped."""
    config = cloud_config(f"http://127.0.0.1:{free_port()}/v1", max_retries=0)  # nothing listens there
    handle = daemon_factory(config)
    forged = "2026-01-01 00:00:00,000 ERROR locod.daemon.cloud: FORGED"
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.connect(handle.endpoint)
        turn = ChatRequest(f"t1\n{forged}", [{"role": "user", "content": "Say hi."}], options=ChatOptions(max_tokens=2))
        sock.send(encode_request(turn))
        while sock.poll(120_000) and json.loads(sock.recv())["type"] not in ("done", "error"):
            pass
    finally:
        ctx.destroy(linger=0)
    assert "falling back to the local model" in handle.log()
    assert not any(line.startswith(forged) for line in handle.log().splitlines())
    assert f"turn t1\\n{forged}" in handle.log()


def test_a_decision_log_removed_or_replaced_under_the_daemon_refuses_turns(daemon_factory: Any) -> None:
    """The decision log deleted (or a backup copied over it) while the daemon ran: turns were accepted and
    "committed" into the file the daemon still had open, all of them gone at its next start. Now a turn is
    refused, naming the cause, while ping and status answer; a restart opens the file at the path."""
    handle = daemon_factory()
    client = handle.client()
    assert client.ask("Say hi.", max_tokens=2).done is not None
    backup = handle.db_path.with_name("backup.db")
    with sqlite3.connect(handle.db_path) as source, sqlite3.connect(backup) as target:
        source.backup(target)
    for swap in (lambda: handle.db_path.unlink(), lambda: os.replace(backup, handle.db_path)):
        swap()
        with pytest.raises(StorageError) as refused:
            client.ask("Say hello.", max_tokens=2)
        assert refused.value.code == "db_replaced" and "restart the daemon" in refused.value.message
        assert client.ping()["pong"] and client.status()["turns_served"] >= 1
    handle.stop()
    restarted = daemon_factory(name="d")
    assert restarted.client().ask("Say hi.", max_tokens=2).done is not None
    assert len(restarted.rows()) == 2  # the backup's turn and this one: none was taken and then lost


def test_a_door_without_authentication_cannot_fill_the_whole_queue(daemon_factory: Any) -> None:
    """Any local user reaches a loopback tcp endpoint without a secret. Its turns, from a few connections
    (each under daemon.max_turns_per_client), filled daemon.queue_limit, and the owner's ipc socket got
    nothing but `busy`. Now each door holds at most its share of the queue."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    handle = daemon_factory({"daemon": {"tcp": endpoint, "queue_limit": 4}})
    owner = handle.client()
    ctx = zmq.Context()
    try:
        flood = ctx.socket(zmq.DEALER)
        flood.connect(endpoint)
        for n in range(4):
            long = ChatRequest(
                f"f{n}", [{"role": "user", "content": "Tell a long story."}], options=ChatOptions(max_tokens=400)
            )
            flood.send(encode_request(long))
        wait_for(lambda: owner.status()["queue"]["in_flight"] >= 2, 30, "the flood's turns to be in flight")
        assert owner.ask("Say hi.", max_tokens=2).done is not None  # the owner's turn is admitted
        refused = []
        while len(refused) < 2 and flood.poll(60_000):
            frame = json.loads(flood.recv())
            if frame["type"] == "error":
                refused.append(frame)
        assert [f["code"] for f in refused] == ["busy", "busy"] and "share of daemon.queue_limit" in refused[0][
            "message"
        ]
    finally:
        ctx.destroy(linger=0)


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("cloud", "timeout_s"),
        ("cloud", "deadline_s"),
        ("cloud", "max_retry_after_s"),
        ("telemetry", "probe_interval_s"),
    ],
)
def test_a_wait_longer_than_python_can_time_is_refused_by_name(
    tmp_path: Path, models_dir: Path, section: str, key: str
) -> None:
    """Python times waits in 64-bit nanoseconds: a timeout over about 292 years raises OverflowError where
    it is used. cloud.timeout_s = 1e10 was accepted and then failed every cloud call as an "invalid reply",
    and the bandwidth probe's thread died at its first wait; a Retry-After wait (within max_retry_after_s
    and deadline_s) would too. Now the config names the key and its range."""
    handle = start_daemon(tmp_path / "d", models_dir, {section: {key: 1e10}}, wait=False)
    try:
        assert handle.proc.wait(60) == 2
    finally:
        handle.stop()
    assert f"{section}.{key} must be between" in handle.log() and "Traceback" not in handle.log()
