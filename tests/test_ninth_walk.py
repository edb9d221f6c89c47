"""A ninth new user's walk: a Python developer embedding locod through ``locod.client.Client`` (threads,
stopping a turn, attachments, errors), and an analyst reading the decision log from docs/operations.md.
Each against a real daemon with the real model."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from locod.client import Client, attachment
from locod.errors import AttachmentError, Busy, ConfigError, RequestError
from locod.protocol import Attachment, DecisionFrame, DeltaFrame

from .conftest import REPO, DaemonHandle, wait_for
from .faultproxy import FaultProxy
from .test_escalation import _daemon, _head


def test_a_client_shared_by_two_threads_says_so_and_serves_each_in_turn(daemon: DaemonHandle) -> None:
    """Walk finding: one Client used from two threads (a web app's worker pool) left one thread with a
    StopIteration and the others with "nothing from locod for 600 s; is it running?" while the daemon ran:
    each thread read the other's frames from the one socket and dropped them as replies it did not know."""
    client = daemon.client()
    caught: list[BaseException] = []

    def other() -> None:
        try:
            client.ask("Say hi", max_tokens=4, force="local")
        except BaseException as exc:
            caught.append(exc)

    frames = client.chat("Count to five", max_tokens=8, force="local")
    assert isinstance(next(frames), DecisionFrame)  # this thread's turn is in flight
    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert len(caught) == 1 and isinstance(caught[0], Busy), caught
    assert caught[0].code == "client_in_use"
    assert "its own Client" in caught[0].message
    assert list(frames)[-1].type == "done"
    # Once this thread's turn has ended, another thread may use the Client.
    caught.clear()
    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert caught == []


def test_leaving_the_chat_loop_cancels_the_turn(daemon: DaemonHandle) -> None:
    """Walk finding: a developer who stopped reading (``break`` at the first text, the user had seen enough)
    left the turn generating all 400 tokens, and their next turn waited behind it for the local model."""
    client = daemon.client()
    decision = 0
    # greedy: this story runs all 400 tokens, where a sampled one could end before the cancel lands
    for frame in client.chat("Write a long story about a dragon", max_tokens=400, force="local", temperature=0.0):
        if isinstance(frame, DecisionFrame):
            decision = frame.decision
        if isinstance(frame, DeltaFrame):
            break

    def cancelled() -> bool:
        rows = daemon.rows("SELECT outcome, error FROM decisions WHERE id = ?", (decision,))
        return rows[0]["outcome"] == "cancelled"

    wait_for(cancelled, 60, "the abandoned turn to be cancelled")
    row = daemon.rows("SELECT error, tokens_out FROM decisions WHERE id = ?", (decision,))[0]
    assert row["error"] == "the client disconnected"
    assert row["tokens_out"] < 400
    # The same Client goes on, on its new connection.
    assert client.ask("Say hi", max_tokens=4, force="local").done.outcome == "ok"


def test_every_attachment_problem_is_an_attachment_error(tmp_path: Path) -> None:
    """Walk finding: ``attachment("notes.md")`` for a file that is not there raised FileNotFoundError, and a
    path with a NUL byte ValueError: neither a LocodError, which the docstrings promise for every error."""
    with pytest.raises(AttachmentError) as missing:
        attachment(tmp_path / "notes.md")
    assert "notes.md: cannot read: No such file or directory" in missing.value.message
    with pytest.raises(AttachmentError) as nul:
        attachment("notes\x00.md")
    assert nul.value.code == "bad_path"
    if os.geteuid() != 0:  # root reads a file whatever its mode
        unreadable = tmp_path / "locked.md"
        unreadable.write_text("x")
        unreadable.chmod(0)
        with pytest.raises(AttachmentError) as denied:
            attachment(unreadable)
        assert "Permission denied" in denied.value.message


def test_the_cli_names_a_missing_attachment(daemon: DaemonHandle, tmp_path: Path) -> None:
    done = daemon.cli("ask", "Summarise", "--attach", str(tmp_path / "notes.md"))
    assert done.returncode == 1
    assert "notes.md: cannot read: No such file or directory" in done.stderr, done.stderr


def test_every_decision_column_is_documented_and_every_documented_one_exists(daemon: DaemonHandle) -> None:
    """The analyst reads docs/operations.md's column table: each column there must exist, each column that
    exists must be there."""
    daemon.client().ask("Say hi", max_tokens=4, force="local")
    with sqlite3.connect(daemon.db_path) as conn:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(decisions)")}
    doc = (REPO / "docs" / "operations.md").read_text()
    table = doc[doc.index("| column | when written") : doc.index("## How locod behaves")]
    named = set()
    for line in table.splitlines()[2:]:
        if line.startswith("|"):
            named |= set(re.findall(r"`([a-z_0-9]+)`", line.split("|")[1]))
    assert columns - named == set()
    assert named - columns == set()


def test_a_mistyped_endpoint_and_a_closed_client_are_locod_errors(daemon: DaemonHandle) -> None:
    """Walk finding: ``Client("localhost:5555")`` raised zmq.error.ZMQError "Invalid argument", and a request on
    a closed Client ZMQError "Socket operation on non-socket": an app catching LocodError caught neither."""
    with pytest.raises(ConfigError) as bad:
        Client("localhost:5555")
    assert bad.value.code == "bad_endpoint"
    assert "ipc://PATH or tcp://HOST:PORT" in bad.value.message
    client = daemon.client()
    client.close()
    with pytest.raises(RequestError) as closed:
        client.ask("Say hi", max_tokens=2)
    assert closed.value.code == "client_closed"
    with pytest.raises(RequestError):
        client.status()


def test_an_escalation_says_the_cloud_answers_without_the_private_attachment(
    daemon_factory: Any, tmp_path: Path, proxy: FaultProxy
) -> None:
    """Walk finding: "Summarise the notes" with a private notes.md was answered locally first, escalated, and
    the cloud, which never saw the notes, made up a summary; the escalated frame said only "not sure enough",
    so the developer's app showed the made-up summary as one of the notes."""
    handle = _daemon(daemon_factory, tmp_path, proxy, _head(min_weight=1000.0, bias=10.0), "private")
    notes = Attachment("document", "notes.md", data=b"The launch is on Tuesday.\n", private=True)
    result = handle.client().ask("Summarise the notes", attachments=[notes], max_tokens=16, temperature=0.0)
    assert result.escalated is not None and result.done.outcome == "escalated"
    assert "private, kept on device: notes.md" in result.escalated.message, result.escalated.message
    assert "Tuesday" not in json.dumps(proxy.chat_requests()[-1].body)  # kept, as it says
