"""Review of the client's resend (849a284): a drop of the connection lost every request in flight on it, but
only the one being read was sent again; the others, their drop already counted, waited out the timeout to be
told the daemon might be stuck. The fake daemon end is test_lead41's (a real ZeroMQ ROUTER). And a request the
daemon read twice (resent, and kept in ZeroMQ's queue across the reconnect) is answered twice: the client takes
the first answer and drops the late one, checked against the real daemon."""

from __future__ import annotations

from pathlib import Path

from locod.client import Client, new_id
from locod.protocol import ResultFrame, SimpleRequest
from tests.conftest import DaemonHandle
from tests.test_lead41 import DroppingEnd


def test_every_read_only_request_lost_with_its_connection_is_sent_again(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    end = DroppingEnd(tmp_path / "run" / "locod.sock", drop_after=2)
    try:
        with Client(end.address, timeout_s=20) as client:
            first = client.send(SimpleRequest(new_id(), "ping"))
            second = client.send(SimpleRequest(new_id(), "status"))
            answers = [list(client.frames(rid, client.timeout_ms)) for rid in (first, second)]
    finally:
        end.close()
    assert all(isinstance(frame, ResultFrame) for frames in answers for frame in frames)
    assert [request["id"] for request in end.received] == [first, second, first, second]


def test_a_request_answered_twice_leaves_the_next_request_its_own_answer(daemon: DaemonHandle) -> None:
    client = daemon.client()
    twice = SimpleRequest(new_id(), "ping")
    rid = client.send(twice)
    client.send(twice)  # as a resend the daemon also read before the connection closed
    assert [frame.type for frame in client.frames(rid, client.timeout_ms)] == ["result"]
    assert "queue" in client.status()  # read past the late second answer, not taken for this one
