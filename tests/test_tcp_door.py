"""The tcp endpoint's shared secret: checked before a message is parsed (a client without it cannot make
the loop decode megabytes), and given to the CLI by a file or the environment rather than argv."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import psutil
import zmq

from locod.client import Client, attachment
from locod.protocol import SimpleRequest, encode_request, leading_fields

from .conftest import DaemonHandle, free_port, locod_command, wait_for

SECRET = "s3cret-token"


def tcp_daemon(factory: Any, tmp_path: Path) -> tuple[DaemonHandle, str, Path]:
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    os.chmod(secret, 0o600)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    return factory({"daemon": {"tcp": endpoint, "tcp_secret_file": str(secret)}}), endpoint, secret


def send_raw(endpoint: str, raw: bytes) -> dict[str, Any]:
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sock.send(raw)
        assert sock.poll(60_000), "no reply"
        reply: dict[str, Any] = json.loads(sock.recv())
        sock.close()
        return reply
    finally:
        ctx.term()


def test_a_large_message_without_the_secret_is_refused_unparsed(daemon_factory: Any, tmp_path: Path) -> None:
    """8 MB that is not even JSON past its first bytes: refused as unauthorized (it was never parsed, or it
    would be `invalid_json`), with the id it began with; the same without a secret but small is parsed
    first, as ever. A client with the secret sends it first and is served, attachments and all."""
    handle, endpoint, _ = tcp_daemon(daemon_factory, tmp_path)
    junk = b'{"id":"big","v":1,"op":"chat","prompt":"' + b"A" * (8 << 20) + b"\x00 not json"
    reply = send_raw(endpoint, junk)
    assert (reply["type"], reply["code"], reply["id"]) == ("error", "unauthorized", "big")
    assert "first in the message" in reply["message"]
    wrong = send_raw(endpoint, b'{"secret":"guess","id":"w","v":1,"op":"chat","prompt":"' + b"A" * (1 << 20) + b'"}')
    assert (wrong["code"], wrong["id"]) == ("unauthorized", "w")
    small = send_raw(endpoint, b'{"id":"s","v":1,"op":"ping","x":')  # small: parsed, so its real fault is named
    assert small["code"] == "invalid_json"
    late = json.dumps({"v": 1, "id": "old", "op": "ping", "secret": SECRET}).encode()  # an older client's order
    assert send_raw(endpoint, late)["type"] == "result"
    document = tmp_path / "notes.md"
    document.write_text("The boat is blue. " * 20_000)  # 360 kB: over the unauthenticated size
    with Client(endpoint, secret=SECRET) as client:
        result = client.ask("What colour is the boat?", attachments=[attachment(document)], max_tokens=2)
    assert result.done.outcome == "ok"
    assert handle.client().ping()["pong"]
    assert [r["outcome"] for r in handle.rows()] == ["ok"]


def test_leading_fields_are_read_only_from_the_front() -> None:
    assert leading_fields(b' { "secret" : "a\\"b" , "id":"x","v":1}') == {"secret": 'a"b', "id": "x"}
    assert leading_fields(b'{"v":1,"secret":"s"}') == {}  # not first: the whole message must be parsed
    assert leading_fields(b'{"secret":"' + b"s" * 5000 + b'"}') == {}  # cut off: not readable from the front
    assert leading_fields(b'{"secret":1}') == {}
    assert leading_fields(base64.b64encode(b"junk")) == {}


def test_the_cli_takes_the_secret_from_a_file_or_the_environment(daemon_factory: Any, tmp_path: Path) -> None:
    """Never only argv, which every user can read in /proc/<pid>/cmdline; the file follows the daemon's
    key-file rule."""
    handle, endpoint, secret = tcp_daemon(daemon_factory, tmp_path)
    env = {k: v for k, v in handle.env.items() if k != "LOCOD_SECRET"}

    def status(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        command = locod_command("--endpoint", endpoint, *args, "status", "--json")
        return subprocess.run(command, capture_output=True, text=True, env={**env, **extra}, timeout=120)

    assert status("--secret-file", str(secret)).returncode == 0
    assert status(LOCOD_SECRET=SECRET).returncode == 0
    refused = status()
    assert refused.returncode == 1 and "needs the shared secret" in refused.stderr
    os.chmod(secret, 0o644)
    loose = status("--secret-file", str(secret))
    assert loose.returncode == 2 and "readable by group or others" in loose.stderr
    both = status("--secret-file", str(secret), "--secret", SECRET)
    assert both.returncode == 2 and "not both" in both.stderr


def test_the_client_writes_the_secret_and_id_first() -> None:
    raw = encode_request(SimpleRequest("r1", "ping", secret=SECRET))
    assert raw.startswith(b'{"secret":"s3cret-token","id":"r1",')
    assert leading_fields(raw) == {"secret": SECRET, "id": "r1"}


def test_a_flood_of_tcp_connections_is_bounded_and_the_others_are_served(daemon_factory: Any) -> None:
    """Plain TCP connections need no secret and hold a descriptor each until ZMTP times them out: past
    daemon.max_tcp_per_host from one address they are shut at once, and the ipc user never notices."""
    port = free_port()
    handle = daemon_factory({"daemon": {"tcp": f"tcp://127.0.0.1:{port}", "max_tcp_per_host": 4}})
    client = handle.client()
    flood = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
    try:
        wait_for(lambda: client.status()["tcp"]["refused"] >= 36, 30, "the flood to be refused")
        assert client.status()["tcp"]["open"] == 4

        def held() -> int:  # connections the daemon's process holds on the endpoint
            conns = psutil.Process(handle.proc.pid).net_connections(kind="tcp")
            return sum(c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED for c in conns)

        wait_for(lambda: held() == 4, 30, "the refused connections to be closed")  # shut, not left waiting
        assert client.ask("Say hi.", max_tokens=2).done is not None  # the ipc user is served throughout
        assert "max_tcp_per_host: closed the oldest connection from 127.0.0.1" in handle.log()
    finally:
        for s in flood:
            s.close()
    wait_for(lambda: client.status()["tcp"]["open"] == 0, 30, "the flood's connections to be let go")
    with Client(f"tcp://127.0.0.1:{port}") as remote:  # room again for a client that speaks
        assert remote.ping()["pong"]


def test_a_tcp_endpoint_without_a_secret_serves_turns_not_the_owners_records(daemon_factory: Any) -> None:
    """Any local user can reach a loopback tcp endpoint that has no secret: it answers chats, ping, status
    and config, but the owner's records, labels and reloads stay on the ipc socket."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    handle = daemon_factory({"daemon": {"tcp": endpoint}, "log": {"prompts": True}})
    owner = handle.client()
    decision = owner.ask("My PIN is 4921.", max_tokens=2).done.decision
    for op, fields in (("decisions", {"limit": 5}), ("feedback", {"decision": decision, "satisfied": False})):
        reply = send_raw(endpoint, json.dumps({"v": 1, "id": op, "op": op, **fields}).encode())
        assert (reply["type"], reply["code"], reply["id"]) == ("error", "unauthorized", op)
        assert "daemon.tcp_secret_file" in reply["message"] and "4921" not in json.dumps(reply)
    reply = send_raw(endpoint, json.dumps({"v": 1, "id": "r", "op": "reload"}).encode())
    assert reply["code"] == "unauthorized"
    # nor files the daemon would read as its owner: an attachment by path names one (~/.ssh, a document)
    secret = handle.home / "owner-notes.txt"
    secret.write_text("the owner's notes")
    by_path = {"kind": "document", "name": "notes.txt", "path": str(secret)}
    chat = {"v": 1, "id": "c", "op": "chat", "messages": [{"role": "user", "content": "Repeat it."}]}
    reply = send_raw(endpoint, json.dumps({**chat, "attachments": [by_path]}).encode())
    assert (reply["code"], reply["id"]) == ("unauthorized", "c") and "attachments by path" in reply["message"]
    with Client(endpoint) as remote:
        assert remote.ask("Say hi.", max_tokens=2).done is not None and remote.ping()["pong"]
        assert remote.status()["pid"] == handle.proc.pid
    assert owner.feedback(decision, True)["satisfied"] is True  # the owner, on the ipc socket
    assert owner.decisions(5)[-1]["prompt"] == "My PIN is 4921."


def test_silent_connections_cannot_keep_the_owners_clients_out(daemon_factory: Any, tmp_path: Path) -> None:
    """A local user without the secret holds every per-host slot with ZeroMQ connections that handshake
    and then say nothing (or the wrong secret). The owner's client still gets in at once, taking the slot
    of the oldest squatter, and once it has sent the secret it is never the one evicted."""
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    os.chmod(secret, 0o600)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    handle = daemon_factory({"daemon": {"tcp": endpoint, "tcp_secret_file": str(secret), "max_tcp_per_host": 3}})
    local = handle.client()
    ctx = zmq.Context()
    try:
        squatters = [ctx.socket(zmq.DEALER) for _ in range(3)]
        for n, squatter in enumerate(squatters):
            squatter.setsockopt(zmq.LINGER, 0)
            squatter.connect(endpoint)
            if n == 0:
                squatter.send(encode_request(SimpleRequest("x", "ping", secret="guess")))
        wait_for(lambda: local.status()["tcp"]["open"] == 3, 30, "the squatters to hold every slot")
        with Client(endpoint, secret=SECRET) as client:  # locod's own client: its first request is answered
            assert client.ping()["pong"]
        owner = ctx.socket(zmq.DEALER)
        owner.setsockopt(zmq.LINGER, 0)
        dropped = owner.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        owner.connect(endpoint)
        owner.send(encode_request(SimpleRequest("o1", "ping", secret=SECRET)))
        assert owner.poll(60_000), "the owner's client was kept out"
        assert json.loads(owner.recv())["data"]["pong"]
        evicted = local.status()["tcp"]["evicted"]
        # The evicted squatters reconnect and evict each other; the owner's connection stays.
        wait_for(lambda: local.status()["tcp"]["evicted"] >= evicted + 3, 60, "the squatters to churn")
        assert not dropped.poll(0), "the owner's vouched-for connection was evicted"
        owner.send(encode_request(SimpleRequest("o2", "ping", secret=SECRET)))
        assert owner.poll(30_000) and json.loads(owner.recv())["id"] == "o2"
        assert "connection from 127.0.0.1 that had sent no request with the secret, for a newcomer" in handle.log()
    finally:
        ctx.destroy(linger=0)
