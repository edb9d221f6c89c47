"""Attack 26: sessions and dialogues, through the socket and the HTTP door, on a real daemon.

Two turns of one session at the same time shared its history and turn number (each read the history before
either answered, both were recorded as the same turn, each answer added after the other's question): a
session's turns now run in arrival order, each seeing the answer before it, and the same chat UI
conversation sent twice at once is answered in a session of its own. A named HTTP session whose history was
trimmed away whole, or sent a conversation edited by its client, put the client's conversation after what
it held: the model read the dialogue twice, out of order.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from locod.client import Client, TurnResult
from locod.protocol import QueuedFrame

from .conftest import SECRET, DaemonHandle, cloud_config, wait_for
from .faultproxy import Fault, FaultProxy
from .test_http import http_daemon

CLOUD = "cloud-small"


def post(base: str, messages: list[dict[str, str]], session: str | None = None) -> tuple[int, dict[str, Any]]:
    """One whole chat completion over HTTP: (status, body)."""
    headers = {"Content-Type": "application/json", **({"x-locod-session": session} if session else {})}
    body = json.dumps({"model": CLOUD, "messages": messages, "max_tokens": 8, "temperature": 0})
    request = urllib.request.Request(f"{base}/v1/chat/completions", body.encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def held_open(base: str, messages: list[dict[str, str]], session: str | None = None) -> http.client.HTTPConnection:
    """A chat completion sent and not read: its turn stays in flight until the connection is closed."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    headers = {"Content-Type": "application/json", **({"x-locod-session": session} if session else {})}
    body = json.dumps({"model": CLOUD, "messages": messages, "max_tokens": 8, "temperature": 0})
    conn.request("POST", "/v1/chat/completions", body, headers)
    return conn


def in_flight(handle: DaemonHandle) -> int:
    return int(handle.client().status()["queue"]["in_flight"])


def turns_of(handle: DaemonHandle, session: str) -> list[tuple[int, str]]:
    rows = handle.rows("SELECT turn, outcome FROM decisions WHERE session = ? ORDER BY id", (session,))
    return [(r["turn"], r["outcome"]) for r in rows]


def sent_to_cloud(proxy: FaultProxy) -> list[tuple[str, str]]:
    """The dialogue the last cloud call was sent: (role, text) of each message."""
    return [(m["role"], m["content"]) for m in proxy.seen[-1].body["messages"] if m["role"] != "system"]


@pytest.fixture
def http_cloud(daemon_factory: Any, proxy: FaultProxy) -> tuple[DaemonHandle, str]:
    """A daemon with the HTTP door whose every turn goes to the loopback cloud behind the proxy."""
    config = {**cloud_config(proxy.base_url, timeout_s=120.0), "daemon": {"max_history_chars": 300}}
    return http_daemon(daemon_factory, config)


def test_turns_of_one_session_sent_at_once_are_answered_in_order_each_seeing_the_last(
    daemon_factory: Any, proxy: FaultProxy
) -> None:
    handle = daemon_factory(cloud_config(proxy.base_url, timeout_s=120.0), extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    held = Fault(kind="hold", times=1)  # the first turn's cloud call waits for the test
    proxy.set(held)
    first, second = Client(handle.endpoint), Client(handle.endpoint)
    answering = first.chat("Remember the word PLUM.", session="s", max_tokens=8)
    opened = next(answering)
    wait_for(lambda: proxy.seen, 120, "the first turn at the cloud")
    waiting = second.chat("Which word?", session="s", max_tokens=4, queued=True)
    assert next(waiting) == QueuedFrame(1)  # behind the first turn of its session, not beside it
    assert handle.client().status()["queue"]["waiting_for_session"] == 1
    assert "1 for an earlier turn of their session" in handle.cli("status").stdout
    held.released.set()
    answer = TurnResult.of([opened, *answering]).text
    TurnResult.of(list(waiting))
    assert sent_to_cloud(proxy) == [("user", "Remember the word PLUM."), ("assistant", answer), ("user", "Which word?")]
    # a turn cancelled by its client leaving (Ctrl-C in `locod chat`): the next turn, sent at once, waits for
    # the cancel to land and then goes on, rather than being refused or run beside it
    proxy.set(Fault(kind="trickle", delay_s=0.01, times=1))
    third = Client(handle.endpoint)
    assert next(third.chat("Count to a thousand.", session="s", max_tokens=8)).type == "decision"
    third.close()
    handle.client().ask("And now?", session="s", max_tokens=4)
    assert turns_of(handle, "s") == [(0, "ok"), (1, "ok"), (2, "cancelled"), (2, "ok")]


def test_requests_of_one_named_http_session_are_answered_in_order(
    http_cloud: tuple[DaemonHandle, str], proxy: FaultProxy
) -> None:
    handle, base = http_cloud
    held = Fault(kind="hold", times=1)
    proxy.set(held)
    first = held_open(base, [{"role": "user", "content": "Remember the word PLUM."}], "chat")
    wait_for(lambda: proxy.seen, 120, "the first request at the cloud")
    gone = held_open(base, [{"role": "user", "content": "Never mind."}], "chat")  # waits, then its client leaves
    wait_for(lambda: handle.client().status()["queue"]["waiting_for_session"] == 1, 120, "a request to wait")
    gone.close()
    wait_for(lambda: handle.client().status()["queue"]["waiting_for_session"] == 0, 120, "the request to leave")
    with ThreadPoolExecutor(1) as pool:
        second = pool.submit(post, base, [{"role": "user", "content": "Which word?"}], "chat")
        wait_for(lambda: handle.client().status()["queue"]["waiting_for_session"] == 1, 120, "the second to wait")
        held.released.set()
        response = first.getresponse()
        answer = json.loads(response.read())["choices"][0]["message"]["content"]
        assert response.status == 200 and second.result()[0] == 200
    assert sent_to_cloud(proxy) == [("user", "Remember the word PLUM."), ("assistant", answer), ("user", "Which word?")]
    assert turns_of(handle, "chat") == [(0, "ok"), (1, "ok")]


def test_a_conversation_sent_twice_at_once_answers_the_second_in_a_session_of_its_own(
    http_cloud: tuple[DaemonHandle, str], proxy: FaultProxy
) -> None:
    handle, base = http_cloud
    asked = [{"role": "user", "content": "Hi"}]
    status, body = post(base, asked)
    session = body["locod"]["session"]
    asked += [{"role": "assistant", "content": body["choices"][0]["message"]["content"]}]
    asked += [{"role": "user", "content": "Tell me more."}]
    proxy.set(Fault(kind="trickle", delay_s=0.01, times=1))
    first = held_open(base, asked)  # continues the session: only its new question is sent
    wait_for(lambda: len(proxy.seen) == 2, 120, "the second turn at the cloud")
    status, again = post(base, asked)  # the same conversation again (a double click, a second tab)
    assert status == 200 and again["locod"]["session"] != session, again
    assert sent_to_cloud(proxy) == [(m["role"], m["content"]) for m in asked]  # carrying its own history
    first.close()
    wait_for(lambda: in_flight(handle) == 0, 120, "the held turn to end")
    assert turns_of(handle, session) == [(0, "ok"), (1, "cancelled")]


def test_a_named_session_trimmed_away_whole_continues_at_its_place(
    http_cloud: tuple[DaemonHandle, str], proxy: FaultProxy
) -> None:
    handle, base = http_cloud
    asked = [{"role": "user", "content": "Read this and say ok: " + "lorem ipsum " * 40}]  # over max_history_chars
    for question in ("What is two and two?", "And three and three?"):
        status, body = post(base, asked, "long")
        assert status == 200, body
        asked += [{"role": "assistant", "content": body["choices"][0]["message"]["content"]}]
        asked += [{"role": "user", "content": question}]
    assert post(base, asked, "long")[0] == 200
    # the history held: the second exchange (the first was trimmed away whole), then the new question; the
    # old code sent the history held, then the whole conversation again after it
    assert sent_to_cloud(proxy) == [(m["role"], m["content"]) for m in asked[2:]]
    assert [turn for turn, _ in turns_of(handle, "long")] == [0, 1, 2]


def test_a_named_session_sent_an_edited_conversation_takes_it_in_place_of_its_history(
    http_cloud: tuple[DaemonHandle, str], proxy: FaultProxy
) -> None:
    handle, base = http_cloud
    body = post(base, [{"role": "user", "content": "My name is Ann."}], "edit")[1]
    answer = {"role": "assistant", "content": body["choices"][0]["message"]["content"]}
    edited = [{"role": "user", "content": "My name is Bob."}, answer, {"role": "user", "content": "My name?"}]
    assert post(base, edited, "edit")[0] == 200
    assert sent_to_cloud(proxy) == [(m["role"], m["content"]) for m in edited]  # not Ann's, then Bob's
    assert post(base, [{"role": "user", "content": "Again?"}], "edit")[0] == 200  # one message: goes on
    assert sent_to_cloud(proxy)[0] == ("user", "My name is Bob.")
    assert [turn for turn, _ in turns_of(handle, "edit")] == [0, 1, 2]


def test_a_session_with_a_turn_in_flight_is_not_evicted(daemon_factory: Any, proxy: FaultProxy) -> None:
    """A full store evicted the least recently used session even while its turn was answered: that answer
    went to a session no longer kept, and the next turn started the dialogue afresh, as turn 0 again."""
    config = {**cloud_config(proxy.base_url, timeout_s=120.0), "daemon": {"max_sessions": 2}}
    handle = daemon_factory(config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    held = Fault(kind="hold", times=1)
    proxy.set(held)
    first = Client(handle.endpoint)
    turn = first.chat("Remember the word PLUM.", session="kept", max_tokens=4)
    assert next(turn).type == "decision"
    wait_for(lambda: proxy.seen, 120, "the turn at the cloud")
    for other in ("b", "c"):  # the store is full at "c": "b" goes, not the session answering
        handle.client().ask("Hi", session=other, max_tokens=2)
    held.released.set()
    assert [frame.type for frame in turn][-1] == "done"
    handle.client().ask("Which word?", session="kept", max_tokens=2)
    assert [t for t, _ in turns_of(handle, "kept")] == [0, 1]
    assert sent_to_cloud(proxy)[0] == ("user", "Remember the word PLUM.")
