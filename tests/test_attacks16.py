"""Attack round 16: one text, three doors. The same extreme text and values sent through the ipc socket,
the tcp endpoint and the HTTP door, and the `locod` command that reads back what they recorded: each test
is a place where the same text came out as something else, or named another thing than it said."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from locod.client import Client

from .conftest import DaemonHandle, free_port, start_daemon

GREEDY = {"max_tokens": 3, "temperature": 0.0}


@pytest.fixture(scope="module")
def doors(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[tuple[DaemonHandle, int]]:
    """One daemon with its HTTP door on (a start per test would cost more than the tests)."""
    port = free_port()
    handle = start_daemon(tmp_path_factory.mktemp("doors"), models_dir, {"http": {"listen": f"127.0.0.1:{port}"}})
    yield handle, port
    handle.stop()


def post_with_session(port: int, session: bytes) -> tuple[int, dict[str, Any]]:
    """A chat completion naming its session by the header's bytes as an HTTP library sends them (UTF-8)."""
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "Say hi."}], **GREEDY}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.putrequest("POST", "/v1/chat/completions")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        conn.putheader(b"x-locod-session", session)
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_a_session_named_over_http_is_the_text_the_client_sent(doors: tuple[DaemonHandle, int]) -> None:
    """Starlette reads a header's bytes as Latin-1, so ``x-locod-session: café`` (UTF-8 on the wire, as
    every HTTP library sends it) ran, was recorded and shown by `locod decisions` as ``cafÃ©``, while the
    socket's ``session`` "café" was recorded as "café"; a name of 60 emoji, 60 characters over the socket,
    was refused over HTTP as over 200 characters (its 240 bytes); and bytes that are no UTF-8 were taken."""
    handle, port = doors
    status, body = post_with_session(port, "café".encode())
    assert status == 200 and body["locod"]["session"] == "café"
    with Client(handle.endpoint) as client:
        over_socket = client.ask("Say hi.", session="café", max_tokens=3, temperature=0.0)
    sessions = handle.rows(
        "SELECT id, session FROM decisions WHERE id IN (?, ?) ORDER BY id",
        (body["locod"]["decision"], over_socket.decision.decision),
    )
    assert [row["session"] for row in sessions] == ["café", "café"]
    shown = handle.cli("decisions", str(body["locod"]["decision"]))
    assert shown.returncode == 0 and "session café" in shown.stdout

    status, body = post_with_session(port, ("\U0001f600" * 60).encode())
    assert status == 200 and body["locod"]["session"] == "\U0001f600" * 60
    status, body = post_with_session(port, ("\U0001f600" * 201).encode())
    assert status == 400 and body["error"]["code"] == "bad_field" and body["error"]["param"] == "x-locod-session"

    status, body = post_with_session(port, b"caf\xe9")  # Latin-1 bytes: not UTF-8 text
    assert status == 400 and body["error"]["code"] == "bad_field" and body["error"]["param"] == "x-locod-session"
    assert "UTF-8" in body["error"]["message"]


@pytest.mark.parametrize("typed", [" 1", "1_0", "\uff11"])
def test_feedback_labels_only_the_decision_its_id_names(doors: tuple[DaemonHandle, int], typed: str) -> None:
    """`locod feedback` read its id with Python's ``int``, which takes `` 1``, ``1_0`` (ten) and a
    full-width ``１``: a slip labelled another decision, and a label is final, where `locod decisions` calls
    each of them no decision. Now it refuses them as a wrong command line (2), before asking the daemon."""
    handle, _ = doors
    with Client(handle.endpoint) as client:
        for _ in range(10 - len(handle.rows())):  # decisions 1 and 10 exist, so each slip named a real one
            client.ask("Say hi.", max_tokens=1, temperature=0.0)
    refused = handle.cli("feedback", "--", typed, "good")
    assert refused.returncode == 2 and "expects a decision id" in refused.stderr
    assert handle.cli("decisions", typed).returncode != 0  # the two commands read an id alike
    assert handle.rows("SELECT id FROM decisions WHERE satisfied IS NOT NULL") == []
