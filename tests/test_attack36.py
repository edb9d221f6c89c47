"""Attack round 36: the work one message costs the daemon. A message's checks run on the daemon's serving
loop (a socket's) or the HTTP door's event loop, and all of Python's threads share one interpreter lock:
a check whose work grows with the square of a message's size held every client of every door. Each check
of client text is linear now; a hostile message of a few hundred KiB is answered (refused or served) while
a bystander is; so is the grading of a cloud answer, whatever its length. Real daemon, real model, real
ZeroMQ, the real `openai` SDK, the fault proxy's hostile streams; no wall-clock bound: a client's timeout
only tells an answer from a daemon held for many minutes."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import openai
import pytest

from .conftest import MODEL_NAME, Context, DaemonHandle, cloud_config, free_port, wait_for
from .faultproxy import Fault, FaultProxy
from .test_attacks14 import dealer, receive, send

# Before the fix each held the daemon over five minutes on this VM, its work growing as its size squared.
KEYS = 150_000  # about 1.6 MB of one JSON object, a key of it repeated
BLANK_LINES = 150_000  # with the rest, within daemon.max_prompt_chars: the turn is answered
MANY_WORDS = 200_000  # about 1.6 MB of a cloud answer
BROKE_OFF_WORDS = "[the cloud's answer broke off here" * 10_000  # the break-off line's opening, never closed


def _object_repeating_a_key() -> str:
    return "{" + ",".join(f'"k{i}":0' for i in range(KEYS)) + ',"k7":1}'


def _hostile_history() -> list[dict[str, str]]:
    """A conversation whose earlier answer is blank lines, then the break-off line's words without its end."""
    return [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "\n" * BLANK_LINES + BROKE_OFF_WORDS + "\r\n" * BLANK_LINES},
        {"role": "user", "content": "Say hello."},
    ]


def test_a_message_repeating_one_key_among_many_is_refused_while_others_are_served(
    daemon: DaemonHandle, ctx: Context
) -> None:
    """Attack finding: both doors refuse a JSON object holding a key twice (which of two would win is the
    parser's choice), and named the key by counting every key anew over the whole object: one message of
    1.6 MB, a key repeated among 150,000, held the daemon's serving loop, and so every client, for over five minutes.
    Now the keys are counted once: the sender is told which key, and a bystander's ping is answered."""
    hostile = dealer(daemon, ctx)
    hostile.send(f'{{"v": 1, "id": "dup", "op": "ping", "extra": {_object_repeating_a_key()}}}'.encode())
    bystander = dealer(daemon, ctx)
    send(bystander, "after", "ping")
    assert receive(bystander)["id"] == "after"
    refused = receive(hostile)
    assert (refused["code"], refused["message"]) == (
        "invalid_json",
        "message is not valid JSON: key 'k7' appears twice in one object",
    )


@pytest.fixture
def http_daemon(daemon_factory: Any) -> tuple[DaemonHandle, str]:
    port = free_port()
    return daemon_factory({"http": {"listen": f"127.0.0.1:{port}"}}), f"http://127.0.0.1:{port}/v1"


def _post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """A body sent as written (the SDKs cannot send a key twice)."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_a_body_repeating_one_key_among_many_is_a_400_naming_it(http_daemon: tuple[DaemonHandle, str]) -> None:
    """The HTTP door reads a body by the socket's rule, on its own event loop: the same object held every
    HTTP client (and, through the interpreter's lock, the socket's) while its keys were counted."""
    _, base_url = http_daemon
    body = f'{{"model": "{MODEL_NAME}", "messages": [], "metadata": {_object_repeating_a_key()}}}'
    status, error = _post(f"{base_url}/chat/completions", body.encode())
    assert (status, error["error"]["code"]) == (400, "invalid_json")
    assert "key 'k7' appears twice in one object" in error["error"]["message"]


def test_an_http_conversation_of_blank_lines_is_answered(http_daemon: tuple[DaemonHandle, str]) -> None:
    """Attack finding: an earlier answer sent back is looked through for the line the door writes where a
    cloud stream broke off (docs/http.md), by a regular expression holding the line ends before that line:
    it tried them anew from each line end, so an answer of 150,000 blank lines (or of the line's opening
    words repeated, never closed) held the HTTP door for tens of minutes, the whole daemon with it. Now the line is
    looked for where its words are, and such a conversation is answered like any other."""
    _, base_url = http_daemon
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
    answer = client.chat.completions.create(model=MODEL_NAME, messages=_hostile_history(), max_tokens=4)  # type: ignore[arg-type]
    assert answer.choices[0].message.content


def test_a_socket_history_of_blank_lines_is_answered(daemon: DaemonHandle) -> None:
    """The socket's turns look through a client's history the same way, for answers made from private
    attachments that it must not send to a cloud (docs/protocol.md), in the turn's thread but under the
    interpreter's lock: the same history held every other turn and client. Now it is answered."""
    done = daemon.client(turn_timeout_s=300).ask(messages=_hostile_history(), max_tokens=4).done
    assert done.outcome == "ok"


def test_a_cloud_answer_of_many_different_words_is_graded_by_its_shadow(daemon_factory: Any, proxy: FaultProxy) -> None:
    """Attack finding: a cloud answer is graded against the local model's (a shadow answer, or the local
    answer an escalation replaced) by the words they share, each of the cloud's different words counted
    anew over both answers: an answer of 200,000 different words (1.6 MB, a long numbered list; within
    `cloud.max_answer_bytes`) kept a core busy for tens of minutes, and an escalated turn's end waited for it. Now
    the words are counted once, and the shadow answer is graded (not the cloud's equal)."""
    config = cloud_config(proxy.base_url, timeout_s=60.0)
    config["routing"]["shadow"] = "always"
    handle = daemon_factory(config)
    proxy.faults.append(Fault("many_words", size=MANY_WORDS, times=1))
    result = handle.client(turn_timeout_s=300).ask("Count up.", max_tokens=64)
    assert (result.decision.location, result.done.outcome) == ("cloud", "ok")
    assert result.text.split()[-1] == f"w{MANY_WORDS - 1}"
    (row,) = wait_for(lambda: [r for r in handle.rows() if r["shadow"]], 300, "the shadow answer's grade")
    shadow = json.loads(row["shadow"])
    assert (shadow["grader"], shadow["satisfied"]) == ("overlap", False)
