"""Walk 43: a developer writing a locod client in another language, from docs/protocol.md alone, with a raw
ZeroMQ DEALER: every op, every frame, the error codes, two dialogues on one connection, a cancel, a reused id,
a restart under an open connection. What the doc did not say, or said wrong, is pinned here the way that
client talks: raw JSON frames over a real socket to a real daemon (the embedded model)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import zmq

from .conftest import Context, DaemonHandle
from .test_docs_protocol import PROTOCOL, section

LONG = {"max_tokens": 200, "force": "local"}
LABEL = {"v": 1, "id": "f", "op": "feedback"}


class Raw:
    """The doc's client: one DEALER, one JSON object a frame, replies sorted by id."""

    def __init__(self, ctx: Context, endpoint: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.frames: dict[str | None, list[dict[str, Any]]] = {}

    def send(self, op: str, rid: str | None = None, **fields: Any) -> str:
        rid = rid or uuid.uuid4().hex
        self.sock.send(json.dumps({"v": 1, "id": rid, "op": op, **fields}).encode())
        return rid

    def send_raw(self, message: dict[str, Any]) -> None:
        self.sock.send(json.dumps(message).encode())

    def read(self, timeout_ms: int = 120_000) -> dict[str, Any]:
        assert self.sock.poll(timeout_ms), "no frame came"
        frame: dict[str, Any] = json.loads(self.sock.recv())
        self.frames.setdefault(frame["id"], []).append(frame)
        return frame

    def until_end(self, rid: str | None, timeout_ms: int = 120_000) -> list[dict[str, Any]]:
        """``rid``'s frames up to its done, error or result (others' kept for their own reading)."""
        while not (self.frames.get(rid) and self.frames[rid][-1]["type"] in ("done", "error", "result")):
            self.read(timeout_ms)
        return self.frames.pop(rid)

    def ask(self, op: str, **fields: Any) -> dict[str, Any]:
        return self.until_end(self.send(op, **fields))[-1]

    def refusal(self, message: dict[str, Any]) -> dict[str, Any]:
        self.send_raw(message)
        return self.until_end(message.get("id") if isinstance(message.get("id"), str) else None)[-1]


@pytest.fixture
def raw(ctx: Context, daemon: DaemonHandle) -> Raw:
    return Raw(ctx, daemon.endpoint)


def test_a_reused_id_and_a_schema_refusal_come_with_the_kinds_the_doc_gives(raw: Raw) -> None:
    """Walk finding: the doc's table of kinds said `bad_request` is "never a frame's kind", while a reused id's
    refusal, `duplicate_id`, came with exactly that kind (as the request table says), and so did a JSON schema
    a local model cannot follow, `bad_field`, which everywhere else is kind `protocol`: a client sorting
    errors by kind met a kind the doc said never comes. The schema's refusal is now kind `protocol` like
    every `bad_field`, and the table names `duplicate_id` as the one frame of kind `bad_request`."""
    raw.send("chat", rid="same", prompt="Tell me a long story about a lighthouse", options=LONG)
    raw.send("chat", rid="same", prompt="again", options=LONG)
    refused = next(f for f in iter(raw.read, None) if f["type"] == "error")
    assert (refused["id"], refused["kind"], refused["code"]) == ("same", "bad_request", "duplicate_id")
    raw.frames["same"].remove(refused)  # the refusal shares the id: what follows is the first turn's
    assert raw.until_end("same")[-1]["type"] == "done", "the turn before goes on"

    remote_ref = {"name": "x", "schema": {"$ref": "https://example.com/s.json"}}
    schema = {"type": "json_schema", "json_schema": remote_ref}
    unfollowed = raw.ask("chat", prompt="hi", options={"force": "local", "response_format": schema})
    assert (unfollowed["kind"], unfollowed["code"]) == ("protocol", "bad_field"), unfollowed

    kind_row = next(row for row in section(PROTOCOL, "Errors").splitlines() if "| `RequestError` |" in row)
    assert "never a frame's kind" not in kind_row
    assert "in a frame only as the kind of `duplicate_id`" in kind_row


@pytest.mark.parametrize(
    ("message", "code", "said"),
    [
        ({**LABEL, "decision": "7", "satisfied": True}, "bad_field", "must be an integer, got a string"),
        ({**LABEL, "decision": 7, "satisfied": 1}, "bad_field", "must be a boolean, got an integer"),
        ({"v": 1, "id": "p", "op": "chat", "prompt": None}, "bad_field", "field 'prompt' must be a string, got null"),
        ({"v": 1, "id": "d", "op": "decisions", "of": [1]}, "bad_field", "field 'of' must be a string, got an array"),
        ({"v": True, "id": "v", "op": "ping"}, "unsupported_version", "unsupported protocol version true;"),
        ({"v": 1, "id": "o", "secret": "s"}, "unknown_op", "unknown op null;"),
        ({"v": 1, "id": "o", "op": "Ping"}, "unknown_op", 'unknown op "Ping";'),
        ({"v": 1, "id": "o", "op": [[["ping"]]] * 99}, "unknown_op", "unknown op an array;"),
    ],
)
def test_a_refusal_names_types_and_values_as_json_does(raw: Raw, message: dict[str, Any], code: str, said: str) -> None:
    """Walk finding: a refusal named a value's type by Python's names ("field 'decision' must be int, got
    str", "got NoneType", "got dict") and quoted values as Python writes them ("unsupported protocol version
    True", "unknown op None"): words a client written in Go or Rust, sending JSON, never wrote. They are now
    JSON's (an integer, a string, null, an array, `true`); a missing `op` is `unknown_op`, as the doc now says."""
    refused = raw.refusal(message)
    assert (refused["type"], refused["code"]) == ("error", code), refused
    assert said in refused["message"], refused["message"]
