"""Sessions are namespaced by door (ipc, tcp, HTTP): a peer of one door can neither continue another
door's dialogue by naming its id (F15) nor evict it with a flood of sessions, one connection each (F24)."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from locod.client import Client

from .conftest import MODEL_NAME, DaemonHandle, free_port


def http_turn(port: int, prompt: str, session: str) -> dict[str, Any]:
    """One turn over HTTP, on a connection of its own (urllib opens one per request)."""
    body = json.dumps({"model": MODEL_NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": 2})
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        body.encode(),
        {"Content-Type": "application/json", "x-locod-session": session},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        reply: dict[str, Any] = json.loads(response.read())
        return reply


def turns_of(handle: DaemonHandle, session: str) -> list[int]:
    return [r["turn"] for r in handle.rows("SELECT turn FROM decisions WHERE session = ? ORDER BY id", (session,))]


def test_the_same_session_id_at_another_door_is_another_dialogue(daemon_factory: Any) -> None:
    port = free_port()
    tcp = f"tcp://127.0.0.1:{free_port()}"
    handle = daemon_factory({"daemon": {"tcp": tcp}, "http": {"listen": f"127.0.0.1:{port}"}})
    handle.client().ask("My code word is PINEAPPLE.", session="work2", max_tokens=2)
    # the HTTP door and the tcp endpoint, naming the ipc user's session, start their own
    assert http_turn(port, "What did I tell you?", "work2")["locod"]["session"] == "work2"
    with Client(tcp) as remote:
        remote.ask("What did I tell you?", session="work2", max_tokens=2)
    assert turns_of(handle, "work2") == [0, 0, 0]
    # each goes on with its own history; the ipc dialogue's second turn follows its first
    handle.client().ask("And now?", session="work2", max_tokens=2)
    http_turn(port, "And now?", "work2")
    assert turns_of(handle, "work2") == [0, 0, 0, 1, 1]


def test_a_flood_of_sessions_through_one_door_evicts_its_own(daemon_factory: Any) -> None:
    port = free_port()
    handle = daemon_factory({"daemon": {"max_sessions": 4}, "http": {"listen": f"127.0.0.1:{port}"}})
    client = handle.client()
    client.ask("Remember 42.", session="victim", max_tokens=2)
    for i in range(6):  # a connection per session: per-connection fairness would let each win a slot
        http_turn(port, f"flood {i}", f"flood-{i}")
    client.ask("Which number?", session="victim", max_tokens=2)
    assert turns_of(handle, "victim") == [0, 1]
    assert client.status()["sessions"] == 4
