"""Guard 45: the settling of a newcomer over a connection bound (guard43, review44), at both doors. The tcp door
settles as the ipc socket does; the held requests' 64 MiB judge the newcomer holding the most, not the one whose
request crossed them; a ninth newcomer is judged at its accept; a chat turn held for a newcomer that closed is
never run; the slots a sweep finds free go to the newcomers already waiting, oldest first.
Real daemon, real ZeroMQ, real SQLite, real llama.cpp."""

from __future__ import annotations

import json
import resource
import time
import uuid
from typing import Any

import zmq

from .conftest import DaemonHandle, free_port, wait_for
from .test_guard43 import ROUNDS, answered, ipc_status, raw_dealer
from .test_review44 import fill_its_half

Context = zmq.Context[zmq.Socket[bytes]]


def ipc_daemon(daemon_factory: Any) -> DaemonHandle:
    """A daemon whose ipc bound is 37 connections, 18 from one process (this one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    handle: DaemonHandle = daemon_factory({}, fd_limit=300)
    return handle


def fill_vouched(ctx: Context, handle: DaemonHandle) -> list[zmq.Socket[bytes]]:
    """This process's half of the ipc bound, each connection vouched for (answered): none can be evicted for a
    newcomer from it, so a newcomer over the bound is let in only when one of them closes."""
    held = fill_its_half(ctx, handle)
    assert all(answered(sock) for sock in held)
    return held


def lone_dealer(ctx: Context, endpoint: str) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
    """A raw DEALER that does not reconnect once the daemon closes it, and its monitor of that close."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, -1)
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    sock.connect(endpoint)
    return sock, monitor


def send_ping(sock: zmq.Socket[bytes]) -> str:
    rid = uuid.uuid4().hex
    sock.send(json.dumps({"v": 1, "id": rid, "op": "ping"}).encode())
    return rid


def answered_to(sock: zmq.Socket[bytes], rid: str) -> bool:
    """Whether the request ``rid``, sent on ``sock`` already, is answered (a dropped one never is: 10 s)."""
    return bool(sock.poll(10_000)) and json.loads(sock.recv())["id"] == rid


def test_a_raw_dealer_that_replaces_a_connection_at_the_tcp_bound_loses_no_request(daemon_factory: Any) -> None:
    """The tcp door settles as the ipc socket does: a client holding every slot its address has closes its
    oldest connection and opens a new one at once, ROUNDS times; every newcomer's request is answered, and
    none was refused or evicted for it."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    handle = daemon_factory({"daemon": {"tcp": endpoint, "max_tcp_per_host": 8}})
    ctx: Context = zmq.Context()
    held = [raw_dealer(ctx, endpoint) for _ in range(8)]
    try:
        assert all(answered(sock) for sock in held)
        lost = 0
        for _ in range(ROUNDS):
            held.pop(0).close(linger=0)
            held.append(raw_dealer(ctx, endpoint))
            lost += not answered(held[-1])
        assert lost == 0
        with handle.client() as client:
            tcp = client.status()["tcp"]
        assert (tcp["refused"], tcp["evicted"]) == (0, 0), tcp
    finally:
        ctx.destroy(linger=0)  # its sockets and their monitors
    assert "refused a connection" not in handle.log() and "Traceback" not in handle.log()


def test_past_the_held_bytes_the_newcomer_holding_the_most_is_refused_not_the_one_crossing(
    daemon_factory: Any,
) -> None:
    """One newcomer holds 56 MiB; a second sends a ping, then 9 MiB that cross the 64 MiB held in all. The
    bound judged the second (its ping dropped), whose request was the smaller, and the first went on
    waiting; now the one holding the most is judged (refused: nothing can be evicted), and the second, still
    waiting, is let in when a slot frees, its ping answered."""
    handle = ipc_daemon(daemon_factory)
    ctx: Context = zmq.Context()
    held = fill_vouched(ctx, handle)
    biggest, biggest_closed = lone_dealer(ctx, handle.endpoint)
    crossing, _ = lone_dealer(ctx, handle.endpoint)
    try:
        biggest.send(b"x" * (56 << 20))
        time.sleep(0.05)  # its 56 MiB go first, so that the second's 9 MiB are what crosses the bound
        rid = send_ping(crossing)
        crossing.send(b"y" * (9 << 20))
        assert biggest_closed.poll(10_000), "the newcomer holding the most was not refused"
        held.pop(0).close(linger=0)
        assert answered_to(crossing, rid)
        assert not biggest.poll(1000)
        assert ipc_status(handle)["refused"] == 1
    finally:
        ctx.destroy(linger=0)  # its sockets and their monitors
    assert "ipc: refused a connection from pid" in handle.log() and "Traceback" not in handle.log()


def test_a_ninth_newcomer_is_judged_at_its_accept_while_eight_settle(daemon_factory: Any) -> None:
    """Eight newcomers over the bound wait, their pings held; a ninth is refused at once (nothing can be evicted
    for it), not held: its connection is closed while the eight still wait (before it could send anything), and
    they are let in, each ping answered, as eight slots free."""
    handle = ipc_daemon(daemon_factory)
    ctx: Context = zmq.Context()
    held = fill_vouched(ctx, handle)
    waiting = [raw_dealer(ctx, handle.endpoint) for _ in range(8)]
    try:
        rids = [send_ping(sock) for sock in waiting]
        _, ninth_closed = lone_dealer(ctx, handle.endpoint)
        assert ninth_closed.poll(10_000), "the ninth newcomer was not refused at its accept"
        for sock in held[:8]:
            sock.close(linger=0)
        assert all(answered_to(sock, rid) for sock, rid in zip(waiting, rids, strict=True))
        assert ipc_status(handle)["refused"] == 1
    finally:
        ctx.destroy(linger=0)  # its sockets and their monitors


def test_a_chat_held_for_a_newcomer_that_closed_is_never_run(daemon_factory: Any) -> None:
    """A newcomer over the bound sends a turn and a label and closes at once, while it settles. The label is
    stored, as on any connection (review44); the turn was run for nobody, its decision recorded, its model's
    time spent: now it is dropped unread, and the daemon serves the next turn."""
    handle = ipc_daemon(daemon_factory)
    with handle.client() as client:
        labelled = client.ask("Say hi.", max_tokens=2).done.decision
    wait_for(lambda: ipc_status(handle)["open"] == 1, 30, "the client's connection to be closed")
    ctx: Context = zmq.Context()
    held = fill_vouched(ctx, handle)
    try:
        newcomer = ctx.socket(zmq.DEALER)
        newcomer.setsockopt(zmq.LINGER, 5000)  # close waits until both requests have left
        newcomer.connect(handle.endpoint)
        for request in (
            {"op": "chat", "prompt": "Say nothing.", "options": {"max_tokens": 2, "stream": False}},
            {"op": "feedback", "decision": labelled, "satisfied": True},
        ):
            newcomer.send(json.dumps({"v": 1, "id": uuid.uuid4().hex, **request}).encode())
        newcomer.close()

        def label_stored() -> bool:
            return handle.rows("SELECT satisfied FROM decisions WHERE id = ?", (labelled,))[0]["satisfied"] == 1

        wait_for(label_stored, 20, "the label to be stored")  # the turn before it was handed over too
        held.pop(0).close(linger=0)  # room for the next client, from this process
        with handle.client() as client:
            following = client.ask("Say hi.", max_tokens=2).done.decision
        assert [row["id"] for row in handle.rows("SELECT id FROM decisions ORDER BY id")] == [labelled, following]
    finally:
        ctx.destroy(linger=0)  # its sockets and their monitors
    assert "Traceback" not in handle.log()


def test_a_slot_a_sweep_finds_free_goes_to_the_newcomer_waiting_first(daemon_factory: Any) -> None:
    """A newcomer waits over the bound; a connection closes and a second newcomer comes at once, its accept often
    read before the close (libzmq reports it late). The second's accept found the closed connection and took
    its slot, and the first, waiting for exactly that close, was refused; now the first is let in, ROUNDS times."""
    handle = ipc_daemon(daemon_factory)
    ctx: Context = zmq.Context()
    held = fill_vouched(ctx, handle)
    try:
        lost = 0
        for _ in range(ROUNDS):
            first = raw_dealer(ctx, handle.endpoint)
            rid = send_ping(first)
            held.pop(0).close(linger=0)
            second = raw_dealer(ctx, handle.endpoint)
            send_ping(second)
            lost += not answered_to(first, rid)
            second.close(linger=0)
            held.append(first)
        assert lost == 0
    finally:
        ctx.destroy(linger=0)  # its sockets and their monitors
    assert "Traceback" not in handle.log()
