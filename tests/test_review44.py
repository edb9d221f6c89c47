"""Review 44: the ipc guard's settling newcomers (guard43). A newcomer over a bound waits, its requests held, for
the closes on their way; one that sent a request and closed at once (a label, a reload: nothing to wait for)
had them dropped with it, though a request that came on any other connection before its close is answered.
Real daemon, real ZeroMQ, real SQLite."""

from __future__ import annotations

import json
import resource
import uuid
from typing import Any

import zmq

from .conftest import DaemonHandle, wait_for
from .test_guard43 import ipc_status, raw_dealer

HALF = 18  # one process's share of the ipc bound at an open-file limit of 300 (37 in all)


def fill_its_half(ctx: zmq.Context[zmq.Socket[bytes]], handle: DaemonHandle) -> list[zmq.Socket[bytes]]:
    """Connections from this process, up to its half of the bound, none of which ever sends a request."""
    held = [raw_dealer(ctx, handle.endpoint) for _ in range(HALF)]
    wait_for(lambda: ipc_status(handle)["open"] > HALF, 30, "this process's connections to be counted")
    return held


def send_and_close(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, request: dict[str, Any]) -> None:
    """A client that sends one request and closes without waiting for its answer (ZeroMQ still delivers it)."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 5000)  # close waits until the request has left
    sock.connect(endpoint)
    sock.send(json.dumps({"v": 1, "id": uuid.uuid4().hex, **request}).encode())
    sock.close()


def test_a_label_sent_by_a_newcomer_that_closes_at_once_over_the_bound_is_stored(daemon_factory: Any) -> None:
    """A newcomer over this process's half, the others before it never asking anything: it settles, its label
    held, and it closes meanwhile. The label was dropped with it (and before the guard held newcomers, one
    evicted the oldest silent connection and was answered); now it is stored, as on any connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    handle = daemon_factory({}, fd_limit=300)
    with handle.client() as client:
        decision = client.ask("Say hi.", max_tokens=2).done.decision
    wait_for(lambda: ipc_status(handle)["open"] == 1, 30, "the client's connection to be closed")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    held = fill_its_half(ctx, handle)
    try:
        send_and_close(ctx, handle.endpoint, {"op": "feedback", "decision": decision, "satisfied": True})

        def labelled() -> bool:
            return handle.rows("SELECT satisfied FROM decisions WHERE id = ?", (decision,))[0]["satisfied"] == 1

        wait_for(labelled, 20, "the label to be stored")
        assert ipc_status(handle)["refused"] == 0  # it closed itself: nothing was refused for it
    finally:
        for sock in held:
            sock.close(linger=0)
        ctx.term()
    assert "Traceback" not in handle.log()
