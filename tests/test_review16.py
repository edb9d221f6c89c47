"""Review 16: this session's change read as its maintainer; the bugs that reading found."""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

from locod.daemon.records import DecisionLog, DecisionRecord, Outcome
from locod.daemon.tallies import Counted, Held, Today

from .conftest import free_port


def _turn(log: DecisionLog, location: str = "cloud") -> int:
    return log.begin(DecisionRecord("s", 0, "r", "0" * 64, 2, None, "chat", location, "m", "test"))


def test_a_turn_paid_as_another_reads_the_new_days_tally_is_counted_once(tmp_path: Path) -> None:
    """Review: a turn's completion was committed, then counted into today's tally. At midnight the next turn's
    decision reads the new day's tally from the log; read between that commit and that count, it found the
    turn in the log and the count added it again: today's spend and answers said it twice, until a restart.
    Now the read waits for a write of money under way until it is counted."""
    log = DecisionLog(tmp_path / "locod.db")
    try:
        assert log.spent_today() == 0.0  # today's tally read: from now on kept in memory
        decision = _turn(log)
        tally, count = log.today, log.today.count
        read: list[Today] = []
        decision_read = threading.Thread(target=lambda: read.append(tally.read()))  # the next turn's decision

        def midnight_between_commit_and_count(
            usd: float,
            answered_by: str | None = None,
            replacing: Counted | None = None,
            releasing: Held | None = None,
        ) -> Counted:
            tally._today.end = time.time()  # the day ends: the next read is the log's
            decision_read.start()
            decision_read.join(timeout=3)  # it reads the log meanwhile, or waits for this count
            return count(usd, answered_by, replacing, releasing)

        tally.count = midnight_between_commit_and_count
        log.finish(decision, Outcome("ok", "cloud", "m", cost_usd=0.5))
        decision_read.join()
        assert [(r.usd, r.turns, r.cloud) for r in read] == [(0.5, 1, 1)]
        assert (log.spent_today(), log.answered_today()) == (0.5, {"turns": 1, "cloud": 1})
    finally:
        log.close()


def test_a_pipelined_request_half_sent_is_not_taken_as_an_idle_connection(daemon_factory: Any) -> None:
    """Review: a connection whose answer was complete counted as idle between requests, and the next newcomer
    at http.max_connections took its slot at once, even when part of a pipelined next request had come with
    the one before it: that request was cut off half sent, and while counted idle it had no deadline. Now it
    is arriving, as any request whose first bytes came, and keeps its slot for ``EVICT_AFTER_S``."""
    port = free_port()
    daemon_factory({"http": {"listen": f"127.0.0.1:{port}", "max_connections": 1}})
    with socket.create_connection(("127.0.0.1", port), timeout=120) as pipelining:
        pipelining.sendall(b"GET /health HTTP/1.1\r\nhost: localhost\r\n\r\nGET /hea")  # the next one begun
        assert _response(pipelining).endswith(b'{"status":"ok"}')  # the door has seen it complete
        newcomer = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        newcomer.request("GET", "/health")
        assert newcomer.getresponse().status == 503  # the door is full: no connection of it is idle
        newcomer.close()
        pipelining.sendall(b"lth HTTP/1.1\r\nhost: localhost\r\n\r\n")
        assert _response(pipelining).endswith(b'{"status":"ok"}')


def test_a_body_sent_after_its_401_leaves_the_connection_idle_not_too_slow(daemon_factory: Any, tmp_path: Path) -> None:
    """Review: a request answered before its body came (a wrong key is refused from the headers) ran on to
    its deadline once the body came, and the door closed the connection there, logging that the client did
    not send its whole request in time: it had, and was idle between requests. A client over a network
    sends the body a round trip after the headers often enough. Now it is idle, as after any answer."""
    key = tmp_path / "key"
    key.write_text("k" * 32)
    key.chmod(0o600)
    port = free_port()
    http = {"listen": f"127.0.0.1:{port}", "api_key_file": str(key), "request_timeout_s": 1.0}
    handle = daemon_factory({"http": http})
    with socket.create_connection(("127.0.0.1", port), timeout=120) as client:
        head = b"host: localhost\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n"
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n" + head)
        assert _response(client).startswith(b"HTTP/1.1 401")
        client.sendall(b"{}")
        time.sleep(2.0)  # past the request's deadline, well within uvicorn's 5 s for an idle connection
        client.sendall(b"GET /health HTTP/1.1\r\nhost: localhost\r\n\r\n")
        assert _response(client).endswith(b'{"status":"ok"}')
    assert "did not send its whole request" not in handle.log()


def _response(conn: socket.socket) -> bytes:
    """One response of a small fixed length, read whole."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(4096) or _closed()
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += conn.recv(4096) or _closed()
    return head + b"\r\n\r\n" + body


def _closed() -> bytes:
    raise ConnectionError("the door closed the connection")
