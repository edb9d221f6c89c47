"""Guard 43: the ipc connection guard and the client around connections the daemon closes. A client that closes
one connection and opens the next at once met the guard still counting the old one (libzmq closes it from its
reaper thread, and the daemon's monitor reports the close after the next accept): its newcomer was shut and its
request lost, which locod's own client hid by sending a read-only request again and any other client waited out.
Real daemon, real ZeroMQ; a fake daemon end of real ZeroMQ for the client's own resends."""

from __future__ import annotations

import fcntl
import json
import resource
import socket
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import zmq

from locod.client import Client, check_alive
from locod.errors import DaemonNotRunning

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


class IdleDroppingEnd:
    """A fake daemon end (a real ROUTER): answers the first request, then closes its connection while the
    client is idle (and binds again); it holds the next request's answer until a copy of it comes or
    ``hold_ms`` passes."""

    def __init__(self, path: Path, hold_ms: int = 3000) -> None:
        self.address = f"ipc://{path}"
        self.hold_ms = hold_ms
        self.received: list[dict[str, Any]] = []
        self.dropped = threading.Event()  # the client reconnected after the drop
        self._go = threading.Event()
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _router(self) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
        """A ROUTER bound at the address, and its monitor of completed handshakes (set before the bind)."""
        router: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        monitor = router.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        router.bind(self.address)
        return router, monitor

    def _receive(self, router: zmq.Socket[bytes]) -> tuple[bytes, dict[str, Any]]:
        peer, raw = router.recv_multipart()
        request = json.loads(raw)
        self.received.append(request)
        return peer, request

    def _answer(self, router: zmq.Socket[bytes], peer: bytes, request: dict[str, Any]) -> None:
        reply = {"v": 1, "id": request["id"], "type": "result", "op": request["op"], "data": {"pong": True}}
        router.send_multipart([peer, json.dumps(reply).encode()])

    def _serve(self) -> None:
        router, monitor = self._router()
        self._answer(router, *self._receive(router))
        self._go.wait()
        self._close(router, monitor)
        router, monitor = self._router()
        if monitor.poll(30_000):  # the client's DEALER is back, so its drop was seen and reported
            self.dropped.set()
        if self.dropped.is_set() and router.poll(30_000):
            peer, request = self._receive(router)
            if router.poll(self.hold_ms):
                self._receive(router)
            self._answer(router, peer, request)
        self._ended.wait()  # closed with linger 0 at once, the answer might never leave
        self._close(router, monitor)

    @staticmethod
    def _close(router: zmq.Socket[bytes], monitor: zmq.Socket[bytes]) -> None:
        router.disable_monitor()
        monitor.close(linger=0)
        router.close(linger=0)

    def drop(self) -> None:
        self._go.set()
        assert self.dropped.wait(30)

    def __enter__(self) -> IdleDroppingEnd:
        return self

    def __exit__(self, *exc: object) -> None:
        self._go.set()
        self._ended.set()
        self._thread.join(30)


def test_a_connection_dropped_while_the_client_was_idle_does_not_send_the_next_request_twice(
    tmp_path: Path,
) -> None:
    """The close of an idle connection (an eviction) was counted only once the next, slow, read-only request
    had gone out and a second passed unanswered: it was sent again, the daemon did its work twice and the
    client dropped the second answer. Only a close after a request went out sends it again."""
    (tmp_path / "run").mkdir()
    with IdleDroppingEnd(tmp_path / "run" / "locod.sock") as end, Client(end.address, timeout_s=20) as client:
        assert client.ping() == {"pong": True}
        end.drop()
        assert client.ping() == {"pong": True}
    first, second = end.received
    assert first["id"] != second["id"] and [first["op"], second["op"]] == ["ping", "ping"]


def test_the_liveness_check_takes_no_connection_where_a_process_holds_the_lock(tmp_path: Path) -> None:
    """Each Client's liveness probe (at its start, and each second of silence) was a connection of its own,
    which at the ipc socket's bound the daemon's guard counted, refused or evicted another for. Where a process
    holds the runtime directory's lock (a daemon, for its life), nothing connects."""
    run = tmp_path / "run"
    run.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener, (run / "locod.lock").open("w") as lock:
        listener.bind(str(run / "locod.sock"))
        listener.listen(8)
        listener.setblocking(False)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        check_alive(f"ipc://{run / 'locod.sock'}")
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing connected
        fcntl.flock(lock, fcntl.LOCK_UN)
        check_alive(f"ipc://{run / 'locod.sock'}")  # a lock no one holds: the probe connects, as before
        listener.accept()[0].close()


def test_a_stale_socket_beside_a_lock_no_one_holds_is_still_no_daemon(tmp_path: Path) -> None:
    """Held: the file a killed daemon left holds no lock (the kernel let go of it), so the probe connects, is
    refused, and says no daemon runs."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "locod.lock").write_text("")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gone:
        gone.bind(str(run / "locod.sock"))  # closed unlistened: the file stays, stale
    with pytest.raises(DaemonNotRunning, match="not running"):
        check_alive(f"ipc://{run / 'locod.sock'}")
