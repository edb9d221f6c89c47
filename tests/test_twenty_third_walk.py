"""Walk 27: an app developer integrating locod into a Python app and a web chat UI, from the README's "From
Python" and HTTP sections, docs/protocol.md, docs/http.md and ``help(Client)``: a streaming chat, sessions,
attachments, errors by code, retries, cancelling, threads, a raw DEALER client, the ``openai`` SDK, and
``Client.decisions`` with its narrowing.

One real daemon (the embedded model) serves every test."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from locod.errors import Busy, ProtocolError, RequestError
from locod.protocol import DecisionFrame, DeltaFrame, DoneFrame

from .conftest import DaemonHandle, free_port, start_daemon, wait_for
from .test_http_door import request


@pytest.fixture(scope="module")
def http_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, http_port: int) -> Iterator[DaemonHandle]:
    """The daemon, with its HTTP door on ``http_port``."""
    config = {"http": {"listen": f"127.0.0.1:{http_port}"}}
    handle = start_daemon(tmp_path_factory.mktemp("walk27"), models_dir, config)
    try:
        yield handle
    finally:
        handle.stop()


def test_a_request_made_inside_a_chat_loop_leaves_the_turns_frames_to_it(daemon: DaemonHandle) -> None:
    """Walk finding: a streaming UI that, inside its ``chat`` loop, asked the same Client for ``status`` (or
    labelled the turn before with ``feedback``) lost the turn's frames that came meanwhile: the other
    request's read dropped them as replies to "an abandoned request". The answer lost words, or, with its
    ``done`` dropped too, the loop waited out ``turn_timeout_s`` and raised ``DaemonNotRunning``. Now each
    request's frames are held for its own loop."""
    client = daemon.client(turn_timeout_s=20)
    before = client.ask("Name a colour.", max_tokens=4)
    turn = client.chat("Write a long story about a dragon.", max_tokens=24, temperature=0.0)
    decision = next(turn)
    assert isinstance(decision, DecisionFrame)
    # The whole turn is answered, so every one of its frames waits on the socket, ahead of what follows.
    answered = "SELECT outcome FROM decisions WHERE id = ?"
    wait_for(lambda: daemon.rows(answered, (decision.decision,)) == [{"outcome": "ok"}])
    assert client.status()["queue"]["in_flight"] == 0
    assert client.feedback(before.decision.decision, True)["decision"] == before.decision.decision
    rest = list(turn)
    assert isinstance(rest[-1], DoneFrame)
    assert "".join(f.text for f in rest if isinstance(f, DeltaFrame)).strip()


def test_decisions_take_a_decision_id_as_frames_carry_it_and_since_as_a_datetime(daemon: DaemonHandle) -> None:
    """Walk finding: ``client.decisions(of=result.decision.decision)``, the id as every frame carries it (an
    int), was refused ``bad_field`` ("'of' must be str"), and ``since=datetime.now() - timedelta(days=1)``
    raised json's TypeError, no LocodError. Now an int id and a datetime are taken as they are meant."""
    client = daemon.client()
    result = client.ask("Name a fruit.", max_tokens=4, session="walk27")
    (record,) = client.decisions(of=result.decision.decision)
    assert record["id"] == result.decision.decision and record["session"] == "walk27"
    day = client.decisions(session="walk27", since=datetime.now() - timedelta(days=1))
    assert [r["id"] for r in day] == [result.decision.decision]
    assert client.decisions(session="walk27", since=datetime.now() + timedelta(hours=1)) == []


def test_a_value_json_cannot_hold_is_a_request_error_with_a_code(daemon: DaemonHandle) -> None:
    """Walk finding: any value JSON cannot hold (a timedelta for ``since``, a numpy integer as a decision id)
    raised a bare TypeError from ``json.dumps``, although every error is to be a LocodError with a stable
    code. Now it is ``bad_field``, naming the type, and nothing is sent."""
    client = daemon.client()
    with pytest.raises(ProtocolError) as refused:
        client.decisions(since=timedelta(days=1))  # type: ignore[arg-type]  # what a caller may pass all the same
    assert refused.value.code == "bad_field" and "timedelta" in refused.value.message
    assert client.ping()["pong"]  # the Client goes on


def test_a_web_page_the_door_refuses_is_told_of_http_cors_origins(daemon: DaemonHandle, http_port: int) -> None:
    """Walk finding: a web chat UI served on another port (its dev server, localhost:3000) that calls the API
    from the browser has its CORS preflight answered 405, "locod serves no OPTIONS ...: it serves POST
    /v1/chat/completions, ...", which the browser's network panel shows beside "CORS error": it named
    neither CORS nor ``http.cors_origins``; nor did the 403 of a page of another host. Both now say that the
    page's origin goes in ``http.cors_origins``. The refusals themselves are as they were."""
    port = http_port
    preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"}
    status, answer = request(port, "OPTIONS", "/v1/chat/completions", headers=preflight)
    assert (status, answer["error"]["code"]) == (405, "method_not_allowed")
    assert 'CORS preflight from "http://localhost:3000"' in answer["error"]["message"]
    assert "http.cors_origins" in answer["error"]["message"]
    status, answer = request(port, "OPTIONS", "/v1/chat/completions")  # no browser: what is served, as before
    assert status == 405 and "it serves POST /v1/chat/completions" in answer["error"]["message"]
    chat = {"model": "auto", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    page = {"Content-Type": "application/json", "Origin": "http://chat.example"}
    status, answer = request(port, "POST", "/v1/chat/completions", chat, page)
    assert (status, answer["error"]["code"]) == (403, "origin_not_allowed")
    assert "http.cors_origins" in answer["error"]["message"]


def test_a_turn_cancelled_with_another_on_its_client_says_so(daemon: DaemonHandle) -> None:
    """Walk finding: two turns streamed on one Client, and the user stopped one (its loop left): the Client
    closed its connection, as ``help(Client)`` says, which cancelled the other as well, but the other's loop
    then waited out ``turn_timeout_s`` (600 s by default) and raised ``DaemonNotRunning``, "the daemon may be
    stuck". Closing the Client during a turn left its loop with zmq's bare "Operation not supported". Now
    the one raises ``Busy`` (``cancelled``), the other ``RequestError`` (``client_closed``), at once."""
    client = daemon.client(turn_timeout_s=30)
    stopped = client.chat("Tell a long story about a cat.", max_tokens=200)
    assert isinstance(next(stopped), DecisionFrame)
    kept = client.chat("Tell a long story about a dog.", max_tokens=200, queued=True)
    next(kept)  # sent: it waits for the local model (queued) or has it (decision)
    stopped.close()
    with pytest.raises(Busy) as cancelled:
        list(kept)
    assert cancelled.value.code == "cancelled"

    turn = client.chat("Tell a long story about a bird.", max_tokens=200)
    next(turn)
    client.close()
    with pytest.raises(RequestError) as closed:
        list(turn)
    assert closed.value.code == "client_closed"
