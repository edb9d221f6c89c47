"""Guard 43: the ipc connection guard and the client around connections the daemon closes. A client that closes
one connection and opens the next at once met the guard still counting the old one (libzmq closes it from its
reaper thread, and the daemon's monitor reports the close after the next accept): its newcomer was shut and its
request lost, which locod's own client hid by sending a read-only request again and any other client waited out.
Real daemon, real ZeroMQ; a fake daemon end of real ZeroMQ for the client's own resends."""

from __future__ import annotations

import json
import resource
import uuid
from typing import Any

import zmq

from .conftest import DaemonHandle

ROUNDS = 600  # the old guard lost about one request in three hundred rounds on this machine


def raw_dealer(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> zmq.Socket[bytes]:
    """A client written from docs/protocol.md alone: a DEALER, no resend, no monitor."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def answered(sock: zmq.Socket[bytes], op: str = "ping") -> bool:
    """Whether one request sent on ``sock`` is answered (a lost one never is: 10 s bounds the wait)."""
    rid = uuid.uuid4().hex
    sock.send(json.dumps({"v": 1, "id": rid, "op": op}).encode())
    return bool(sock.poll(10_000)) and json.loads(sock.recv())["id"] == rid


def ipc_status(handle: DaemonHandle) -> dict[str, int]:
    """`locod status`'s ipc section, asked from a process of its own (this one holds its half of the bound)."""
    status = handle.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    return dict(json.loads(status.stdout)["ipc"])


def test_a_raw_dealer_that_replaces_a_connection_at_the_bound_loses_no_request(daemon_factory: Any) -> None:
    """A process holding its half of the ipc socket's bound closes its oldest connection and opens a new one at
    once, ROUNDS times: every request the newcomer sends is answered, and none was refused or evicted for it,
    as each came when a slot was in fact free."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    handle = daemon_factory({}, fd_limit=300)  # the ipc bound 37, 18 from one process
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    held = [raw_dealer(ctx, handle.endpoint) for _ in range(18)]
    try:
        assert all(answered(sock) for sock in held)
        lost = 0
        for _ in range(ROUNDS):
            held.pop(0).close(linger=0)
            held.append(raw_dealer(ctx, handle.endpoint))
            lost += not answered(held[-1])
        assert lost == 0
        ipc = ipc_status(handle)
        assert (ipc["refused"], ipc["evicted"]) == (0, 0), ipc
    finally:
        for sock in held:
            sock.close(linger=0)
        ctx.term()
    assert "refused a connection" not in handle.log() and "Traceback" not in handle.log()


def test_a_newcomer_past_the_bound_is_still_refused_and_its_held_request_dropped(daemon_factory: Any) -> None:
    """Held: with no connection closing, a newcomer over the process's half is shut once it has settled, its
    request never answered (a raw DEALER waits out its own timeout), and the connections before it serve on."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    handle = daemon_factory({}, fd_limit=300)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    held = [raw_dealer(ctx, handle.endpoint) for _ in range(18)]
    try:
        assert all(answered(sock) for sock in held)
        newcomer = raw_dealer(ctx, handle.endpoint)
        rid = uuid.uuid4().hex
        newcomer.send(json.dumps({"v": 1, "id": rid, "op": "ping"}).encode())
        assert not newcomer.poll(3000)
        newcomer.close(linger=0)
        assert all(answered(sock) for sock in held)
        assert ipc_status(handle)["refused"] > 0
    finally:
        for sock in held:
            sock.close(linger=0)
        ctx.term()
    assert "ipc: refused a connection from pid" in handle.log()
