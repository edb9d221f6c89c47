"""Attack round 15: the HTTP door as OpenAI-compatible clients use it: the real `openai` SDK and raw HTTP
against a running daemon (docs/http.md). Each test is a way a client met something other than what
OpenAI's API documents, and now does not."""

from __future__ import annotations

import base64
import http.client
import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from .conftest import SECRET, DaemonHandle, cloud_config, free_port, start_daemon
from .faultproxy import Fault, FaultProxy

# Greedy, so the answer is the same each time: Japanese, whose characters take the model several tokens
# each, so the answer streams in fewer pieces than it has tokens.
JAPANESE = {"messages": [{"role": "user", "content": "Translate to Japanese: Good morning, how are you today?"}]}
GREEDY = {"temperature": 0.0, "seed": 1}
HI: Any = [{"role": "user", "content": "Say hi."}]
IMAGE_PART = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"png").decode()}}


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[tuple[DaemonHandle, int]]:
    """One daemon with its HTTP door on, for the tests that need nothing else of it (a start each would
    cost more than the tests)."""
    port = free_port()
    handle = start_daemon(tmp_path_factory.mktemp("door"), models_dir, {"http": {"listen": f"127.0.0.1:{port}"}})
    yield handle, port
    handle.stop()


def sdk(port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)


def post(port: int, body: Any) -> http.client.HTTPResponse:
    """A chat completion over a connection of its own, its response (read it before the next)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    return conn.getresponse()


def test_an_answer_cut_at_max_tokens_finishes_for_length_however_it_streamed(door: tuple[DaemonHandle, int]) -> None:
    """A local answer counted its tokens as the pieces of text llama.cpp streams, and a piece holds several
    tokens when a character takes several (Japanese, an emoji) or text is held back while it may begin a
    stop string: an answer cut at max_tokens=12 after 7 pieces came back with ``finish_reason`` ``stop``
    (a client took the cut answer for a whole one) and ``completion_tokens`` 7, in the decision log too."""
    handle, port = door
    whole = sdk(port).chat.completions.create(model="auto", max_tokens=12, **GREEDY, **JAPANESE)  # type: ignore[call-overload]
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 12
    chunks = list(
        sdk(port).chat.completions.create(  # type: ignore[call-overload]
            model="auto", max_tokens=12, stream=True, stream_options={"include_usage": True}, **GREEDY, **JAPANESE
        )
    )
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == whole.choices[0].message.content and len(pieces) < 12  # what the test is about
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    (row,) = handle.rows("SELECT tokens_out FROM decisions WHERE request_id = ?", (whole.id,))
    assert row["tokens_out"] == whole.usage.completion_tokens
    ended = sdk(port).chat.completions.create(model="auto", max_tokens=200, messages=HI, **GREEDY)  # type: ignore[call-overload]
    assert ended.choices[0].finish_reason == "stop"  # an answer that ended by itself still says so
    assert ended.usage is not None and 0 < ended.usage.completion_tokens < 200


def test_a_stream_is_framed_as_openai_frames_it(door: tuple[DaemonHandle, int]) -> None:
    """Events ended in CRLF lines (sse-starlette's default): valid SSE, but a client that splits the body
    on a blank line, ``\\n\\n``, as many hand-written ones do, found no event in it. Each chunk read the
    clock for its ``created``, which OpenAI keeps the same for every chunk of a completion."""
    _, port = door
    response = post(port, {"model": "auto", "max_tokens": 64, "stream": True, **GREEDY, **JAPANESE})
    body = response.read()
    assert response.status == 200 and response.getheader("content-type", "").startswith("text/event-stream")
    assert b"\r" not in body and body.endswith(b"data: [DONE]\n\n")
    events = body.decode().split("\n\n")[:-1]
    assert all(event.startswith("data: ") for event in events), events
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-1]]
    assert len(chunks) > 3 and {c["created"] for c in chunks} == {chunks[0]["created"]}
    assert {c["id"] for c in chunks} == {response.getheader("x-request-id")}


def test_the_sdks_request_id_names_the_turn(door: tuple[DaemonHandle, int]) -> None:
    """The SDKs keep a reply's ``x-request-id`` (``completion._request_id``, an error's ``request_id``) for a
    client's logs; it was missing. It is now the completion's id, which ``locod decisions`` takes."""
    handle, port = door
    raw = sdk(port).chat.completions.with_raw_response.create(model="auto", max_tokens=2, messages=HI)
    completion = raw.parse()
    assert raw.headers["x-request-id"] == completion._request_id == completion.id
    shown = handle.cli("decisions", completion.id, "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)[0]["id"] == int(raw.headers["x-locod-decision"])


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        # a role that is not a string: TypeError (unhashable) in the role check, a bare 500 in plain text
        ({"messages": [{"role": ["user"], "content": "Hi"}]}, 400, "messages[0]"),
        ({"messages": [{"role": {}, "content": "Hi"}]}, 400, "messages[0]"),
        # the limit sent as max_completion_tokens was refused as 'max_tokens', a field the client never sent
        ({"messages": HI, "max_completion_tokens": 0, "max_tokens": 5}, 400, "max_completion_tokens"),
        # a spoken answer or a web search asked for, answered with plain text as if it had been done
        ({"messages": HI, "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, 400, "audio"),
        ({"messages": HI, "modalities": ["text", "audio"]}, 400, "modalities"),
        ({"messages": HI, "web_search_options": {}}, 400, "web_search_options"),
        # an image in a system message was dropped unseen (images are a user message's, as OpenAI has them)
        ({"messages": [{"role": "system", "content": [IMAGE_PART]}, *HI]}, 400, "messages[0]"),
        ({"messages": HI, "modalities": ["text"], "audio": None, "max_tokens": 1}, 200, None),  # the default
    ],
)
def test_request_shapes_are_answered_or_refused_by_name(
    door: tuple[DaemonHandle, int], body: dict[str, Any], status: int, param: str | None
) -> None:
    _, port = door
    response = post(port, {"model": "auto", **body})
    answer = json.loads(response.read())
    assert response.status == status and response.getheader("content-type") == "application/json", answer
    if param is not None:
        assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["param"] == param


def test_bytes_that_are_no_http_request_get_openais_error_shape(door: tuple[DaemonHandle, int]) -> None:
    """uvicorn answered them in plain text, ``Invalid HTTP request received.``: the one answer of the door
    not in OpenAI's error shape. Also what follows a body longer than its Content-Length on a kept-alive
    connection, after the request itself was answered. And it logged a line for each: a client sending
    them in a loop filled the log."""
    handle, port = door
    body = json.dumps({"model": "auto", "max_tokens": 1, "messages": HI}).encode()
    start = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    longer = f"{start}Content-Length: {len(body)}\r\n\r\n".encode() + body + b"}}\r\n\r\n"
    for sent, statuses in ((b"NOT HTTP\r\n\r\n", [b"400"]), (longer, [b"200", b"400"])):
        with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
            s.sendall(sent)
            received = b""
            while chunk := s.recv(65536):
                received += chunk
        assert re.findall(rb"HTTP/1\.1 (\d{3}) ", received) == statuses, received
        head, _, last = received.rpartition(b"\r\n\r\n")
        assert b"content-type: application/json" in head.rpartition(b"HTTP/1.1 400 Bad Request")[2]
        error = json.loads(last)["error"]
        assert error["code"] == "bad_request" and "not valid HTTP/1.1" in error["message"]
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
            s.sendall(b"NOT HTTP\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 400 Bad Request")
    assert handle.log().count("Invalid HTTP request received") == 1


def test_a_turn_that_fails_after_its_text_names_itself(daemon_factory: Any, proxy: FaultProxy) -> None:
    """The cloud's stream breaks after its first text and the local model, whose context cannot hold the
    prompt, cannot stand in: the stream ends with an ``error`` event the SDK raises, the unstreamed turn
    with a 502; either carries the completion's id as its request id, by which its record is found."""
    port = free_port()
    config = cloud_config(proxy.base_url, timeout_s=60.0)
    short = {"name": "short", "path": "SmolLM2-135M-Instruct.Q4_1.gguf", "n_ctx": 256}
    config.update(http={"listen": f"127.0.0.1:{port}"}, local={"default": "short", "models": [short]})
    handle = daemon_factory(config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    ask: Any = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 40 + "\nSay hi."}]
    proxy.set(Fault("cut", cut_after_chunks=3, times=1))
    stream = sdk(port).chat.completions.create(model="cloud-small", messages=ask, max_tokens=30, stream=True)
    got: list[ChatCompletionChunk] = []
    with pytest.raises(openai.APIError) as broke:
        for chunk in stream:
            got.append(chunk)
    assert any(c.choices and c.choices[0].delta.content for c in got)  # it failed after text was sent
    assert broke.value.code == "cloud_stream_cut" and "local fallback failed" in broke.value.message
    proxy.set(Fault("cut", cut_after_chunks=3, times=1))
    with pytest.raises(openai.APIStatusError) as failed:
        sdk(port).chat.completions.create(model="cloud-small", messages=ask, max_tokens=30)
    assert failed.value.status_code == 502 and failed.value.request_id
    streamed, whole = handle.rows("SELECT request_id, outcome FROM decisions ORDER BY id")
    assert streamed == {"request_id": got[0].id, "outcome": "error"}
    assert whole == {"request_id": failed.value.request_id, "outcome": "error"}


def test_idle_kept_alive_connections_cannot_keep_everyone_else_out(daemon_factory: Any) -> None:
    """Connections kept alive between requests, each refreshed by a ``GET /health`` (no key needed) every
    few seconds, held every slot of the door for good: a newcomer was answered 503 however long it tried,
    as an idle connection was never taken. Now a newcomer takes the slot of the connection idle longest (its
    client opens another when it next asks); one whose answer is streaming is still never taken."""
    port = free_port()
    daemon_factory({"http": {"listen": f"127.0.0.1:{port}", "max_connections": 4}})
    streaming = sdk(port).chat.completions.create(model="auto", messages=HI, max_tokens=200, stream=True)
    chunks = iter(streaming)
    first = next(chunks)  # its answer streams on the door's first connection
    idle = [http.client.HTTPConnection("127.0.0.1", port, timeout=120) for _ in range(3)]
    for conn in idle:  # each asks once, then keeps its connection, as a client's pool does
        conn.request("GET", "/health")
        assert conn.getresponse().read() == b'{"status":"ok"}'
    newcomers = [sdk(port) for _ in range(4)]
    for client in newcomers:  # each takes an idle slot: the three, then the newcomer before it
        assert client.models.list().data[0].id == "auto"
    closed = 0
    for conn in idle:
        try:
            conn.request("GET", "/health")
            conn.getresponse().read()
        except (ConnectionError, http.client.HTTPException):
            closed += 1
    assert closed == 3
    rest = list(chunks)
    assert rest[-1].choices[0].finish_reason in ("stop", "length") and rest[-1].id == first.id


def test_a_websocket_upgrade_holds_no_slot(daemon_factory: Any) -> None:
    """With the websockets package installed beside locod, uvicorn took a request's ``Upgrade: websocket``
    and handed its connection to a protocol of its own, out of the door's count: each such request, answered
    403 and closed, kept its slot for good, and ``http.max_connections`` of them (no key needed) shut the
    door, 503 to everyone. The door serves no WebSockets: the request is answered as HTTP/1.1."""
    pytest.importorskip("websockets")  # without it uvicorn upgrades nothing, and no slot was lost
    port = free_port()
    handle = daemon_factory({"http": {"listen": f"127.0.0.1:{port}", "max_connections": 4}})
    upgrade = (
        "GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    for _ in range(8):
        with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
            s.sendall(upgrade.encode())
            assert s.recv(65536).startswith(b"HTTP/1.1 200 OK")
    assert sdk(port).models.list().data[0].id == "auto"
    assert handle.log().count("asked to upgrade") == 1 and "WebSocket library" not in handle.log()
