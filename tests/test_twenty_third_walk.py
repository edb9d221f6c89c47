"""Walk 27: an app developer integrating locod into a Python app and a web chat UI, from the README's "From
Python" and HTTP sections, docs/protocol.md, docs/http.md and ``help(Client)``: a streaming chat, sessions,
attachments, errors by code, retries, cancelling, threads, a raw DEALER client, the ``openai`` SDK, and
``Client.decisions`` with its narrowing.

One real daemon (the embedded model) serves every test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from locod.protocol import DecisionFrame, DeltaFrame, DoneFrame

from .conftest import DaemonHandle, start_daemon, wait_for


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[DaemonHandle]:
    handle = start_daemon(tmp_path_factory.mktemp("walk27"), models_dir)
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
