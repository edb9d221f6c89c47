"""mend30: a refused HTTP turn leaves its named session as it was; paging the decision log (``--before``);
a reset decision log is noticed by MESS+; a proxy refusing CONNECT is named and not counted as the cloud
reached."""

from __future__ import annotations

import json
import logging
import socketserver
import sqlite3
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from locod.daemon.cloud import CloudBackend
from locod.daemon.config import load_config
from locod.daemon.learner import Learner
from locod.daemon.records import DecisionLog

from .conftest import MODEL_NAME, DaemonHandle, cloud_config, free_port, locod_command, write_config
from .test_mend28 import routed


def http_chat(port: int, messages: list[dict[str, str]], session: str) -> tuple[int, dict[str, Any]]:
    """One chat completion naming ``session``: (HTTP status, body)."""
    body = json.dumps({"model": MODEL_NAME, "messages": messages, "max_tokens": 2, "temperature": 0})
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        body.encode(),
        {"Content-Type": "application/json", "x-locod-session": session},
    )
    try:
        with urllib.request.urlopen(request, timeout=180) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def tokens_in(handle: DaemonHandle, session: str) -> list[int]:
    rows = handle.rows("SELECT tokens_in FROM decisions WHERE session = ? ORDER BY id", (session,))
    return [r["tokens_in"] for r in rows]


def test_a_refused_http_turn_leaves_its_named_session_history(daemon_factory: Any) -> None:
    port = free_port()
    handle = daemon_factory({"http": {"listen": f"127.0.0.1:{port}"}})
    story = "My code word is PINEAPPLE. " + "The harbour was quiet that morning. " * 40
    status, first = http_chat(port, [{"role": "user", "content": story}], "notes")
    assert status == 200, first
    answer = first["choices"][0]["message"]["content"]
    # a whole conversation the session does not hold (an edited one), refused: its last message fits no context
    edited = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "word " * 5000},
    ]
    status, refused = http_chat(port, edited, "notes")
    assert status == 400 and refused["error"]["code"] == "prompt_too_long", refused
    # the next turn sends its new message alone: the session still holds the story and its answer
    status, second = http_chat(port, [{"role": "user", "content": "What is my code word?"}], "notes")
    assert status == 200, second
    first_in, second_in = tokens_in(handle, "notes")
    assert second_in > first_in, (first_in, second_in, answer)
    # an accepted whole conversation still replaces the session's history
    status, replaced = http_chat(port, edited[:2] + [{"role": "user", "content": "Bye"}], "notes")
    assert status == 200, replaced
    assert tokens_in(handle, "notes")[-1] < first_in


def ids(rows: list[dict[str, Any]]) -> list[int]:
    return [row["id"] for row in rows]


def test_the_decision_log_pages_back_with_before(daemon: DaemonHandle) -> None:
    client = daemon.client()
    for i in range(6):  # decisions 1-6; the even ones in session "pages"
        client.ask(f"Say {i}.", session="pages" if i % 2 else "other", max_tokens=2)
    assert "before" in client.ping()["decisions_narrowing"]
    assert ids(client.decisions(limit=2)) == [6, 5]
    assert ids(client.decisions(limit=2, before=5)) == [4, 3]
    assert ids(client.decisions(session="pages", before=6)) == [4, 2]
    # a full page says on stderr how to read the one before it; running that does
    page = daemon.cli("decisions", "--limit", "2", "--session", "pages")
    assert page.returncode == 0, page
    older = "older: locod decisions --limit 2 --session pages --before 4"
    assert older in page.stderr, page.stderr
    before = daemon.cli(*older.removeprefix("older: locod ").split())
    assert before.returncode == 0 and "older:" not in before.stderr, before
    assert [line.split()[0] for line in before.stdout.splitlines()[1:]] == ["2"]
    # the log at rest pages the same way
    assert daemon.stop() == 0
    rest = daemon.cli("decisions", "--limit", "2", "--before", "5", "--json")
    assert ids(json.loads(rest.stdout)) == [4, 3], rest
    assert "older: locod decisions --limit 2 --before 3 --json" in rest.stderr, rest.stderr


def test_a_decision_log_emptied_under_a_kept_messplus_state_is_noticed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Decision ids restart at 1 in a log whose rows were deleted (or whose file was): the MESS+ state's
    settled ids then named the new log's turns, and a new turn answered but not settled at a kill was
    taken for settled. The real Learner over a real decision log, as test_mend28's."""
    loaded = load_config(write_config(tmp_path / "config.toml", {"paths": {"state_dir": str(tmp_path / "state")}}))
    db = tmp_path / "state" / "locod.db"

    def start(records: DecisionLog) -> Learner:
        return Learner(loaded, records, CloudBackend(loaded.cloud, loaded.source))

    records = DecisionLog(db)
    try:
        old = start(records)
        for _ in range(3):
            old.settle(*routed(records, old), "Hi", "Hello")
        old.close()  # a clean stop: the state was kept with decisions 1-3
    finally:
        records.close()
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("DELETE FROM decisions")
    records = DecisionLog(db)
    try:
        with caplog.at_level(logging.WARNING, "locod.daemon.learner"):
            emptied = start(records)
        assert "below the 3 the MESS+ state was kept with" in caplog.text
        assert emptied.mess.state.settled_ids == {} and emptied.mess.state.stopped_at is None
        emptied.settle(*routed(records, emptied), "Hi", "Hello")  # decision 1 again, settled
        two, _ = routed(records, emptied)  # answered, then killed before its settling
        assert two == 2
        again = start(records)  # settles decision 2, which the old log's ids had taken for settled
        assert again.mess.state.settled == 5 and set(again.mess.state.settled_ids) == {1, 2}
        again.close()
    finally:
        records.close()


class RefusingProxy(socketserver.ThreadingTCPServer):
    """An HTTP proxy on loopback that answers every CONNECT ``403 Forbidden``, as a corporate proxy that does
    not allow the endpoint's host does; it counts the CONNECTs."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), RefusingProxy.Handler)
        self.connects: list[str] = []

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            line = self.rfile.readline().decode("latin-1")
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            assert isinstance(self.server, RefusingProxy)
            self.server.connects.append(line.strip())
            self.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


@pytest.fixture
def refusing_proxy() -> Iterator[RefusingProxy]:
    proxy = RefusingProxy()
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    yield proxy
    proxy.shutdown()
    proxy.server_close()


def test_a_proxy_refusing_connect_is_named_and_nothing_counted_sent(
    daemon_factory: Any, refusing_proxy: RefusingProxy
) -> None:
    port = refusing_proxy.server_address[1]
    handle = daemon_factory(
        cloud_config("https://cloud.example.com/v1", max_retries=0),
        extra_env={"HTTPS_PROXY": f"http://127.0.0.1:{port}", "LOCOD_CLOUD_API_KEY": "sk-test"},
    )
    result = handle.client(turn_timeout_s=300).ask("Hi", max_tokens=2)
    assert result.done.outcome == "fallback"  # the local model answers in its place
    assert "CONNECT cloud.example.com:443 HTTP/1.1" in refusing_proxy.connects
    (row,) = handle.rows()
    # named as the proxy's refusal, with its status line, and the turn's text not counted as sent (it was
    # counted as read by the endpoint: "unreachable", and two bytes up)
    assert f"the proxy http://127.0.0.1:{port} refused to connect to it (HTTP 403 Forbidden)" in row["error"], row
    assert row["bytes_up"] == 0


def test_before_outside_the_ids_is_a_usage_error() -> None:
    for wrong in ("0", str(1 << 63), "-3"):
        refused = subprocess.run(
            locod_command("decisions", "--before", wrong), capture_output=True, text=True, timeout=120
        )
        assert refused.returncode == 2 and "--before" in refused.stderr, refused
