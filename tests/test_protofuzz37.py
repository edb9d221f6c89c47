"""A sweep of the socket protocol's requests: every op's every field, read from locod.protocol (``OPS``,
``OP_FIELDS``, ``OPTIONS``, ``Attachment``'s fields), so a field added there is swept too, against one table
of wrong values (wrong JSON types, null, empty, huge, negative, NaN and Infinity tokens, deep nesting, a
boolean or a float where an integer goes, NUL, lone surrogates, RTL marks), and the frame-level faults.

Each answer is held to docs/protocol.md, written down here as one rule per field (``DOC``): a value the doc
accepts parses, any other is refused with the doc's stable code, naming the field by its whole path. The
whole matrix runs in process; a sample of it, and every frame fault, over a real daemon's socket, where no
request may go unanswered, none may leave a traceback, and a bystander's ping and turn are served throughout.

Found: a mistyped option or attachment key was named bare ("field 'stream' must be bool", "field 'kind'
must be str": which attachment's?), while its range errors said 'options.force' and 'attachments[0].kind';
a lone surrogate was refused as "message holds ...", naming no field, and the reply echoed an id holding one
(which a strict JSON decoder, Go's or Rust's, cannot read); an unknown op or version was echoed whole (a
megabyte of it)."""

from __future__ import annotations

import base64
import binascii
import json
import math
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import pytest

from locod.protocol import OP_FIELDS, OPS, OPTIONS, Attachment, BadRequest, parse_request

from .conftest import DaemonHandle
from .test_http import http_daemon
from .test_protocol36 import LAST, Raw

COMMON = ("v", "id", "op", "secret")  # every op's (docs/protocol.md, Requests)
BASE: dict[str, dict[str, Any]] = {"chat": {"prompt": "Say hi."}, "feedback": {"decision": 1, "satisfied": True}}
DOCUMENT = {"kind": "document", "data": base64.b64encode(b"The sky is green here.").decode()}
MB = 1 << 20
VALUES: dict[str, Any] = {
    "text": "x",
    "int": 5,
    "bool_for_int": True,
    "float_for_int": 1.0,
    "fraction": 1.5,
    "negative": -1,
    "zero": 0,
    "null": None,
    "empty_text": "",
    "blank": "   ",
    "empty_list": [],
    "empty_object": {},
    "list": [1],
    "object": {"a": 1},
    "huge_float": 1e308,
    "two_to_64": 2**64,
    "400_digits": 10**400,
    "nan": math.nan,  # json.dumps writes NaN, Infinity: not JSON, but Python's json reads them
    "infinity": math.inf,
    "minus_infinity": -math.inf,
    "nested": json.loads("[" * 500 + "]" * 500),
    "megabyte": "x" * MB,
    "nul": "a\x00b",
    "lone_surrogate": "a\ud800b",
    "rtl": "\u202eabc\u200f",
}


# -- what docs/protocol.md says each field accepts ---------------------------------------------------


def text(lo: int = 0, hi: int = 1 << 62) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and lo <= len(v) <= hi


def integer(lo: int, hi: int) -> Callable[[Any], bool]:
    return lambda v: type(v) is int and lo <= v <= hi


def number(lo: float, hi: float) -> Callable[[Any], bool]:  # NaN is in no range
    return lambda v: isinstance(v, int | float) and not isinstance(v, bool) and lo <= v <= hi


def one_of(*names: str) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and v in names


def optional(rule: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """The doc: an optional field sent as null is that field left out."""
    return lambda v: v is None or rule(v)


def boolean(v: Any) -> bool:
    return isinstance(v, bool)


def base64_text(v: Any) -> bool:
    try:
        return isinstance(v, str) and base64.b64decode(v, validate=True) is not None
    except (binascii.Error, ValueError):
        return False


def stop_sequences(v: Any) -> bool:
    return isinstance(v, list) and len(v) <= 4 and all(text(1, 200)(s) for s in v)


INT64 = integer(-(2**63), 2**63 - 1)
DOC: dict[str, Callable[[Any], bool]] = {
    "v": lambda v: type(v) is int and v == 1,
    "id": text(1, 200),
    "op": lambda v: False,  # no value of the table names an op
    "secret": optional(text()),
    "prompt": lambda v: isinstance(v, str) and bool(v.strip()),
    "messages": lambda v: False,  # no value of the table is a conversation ending with a user message
    "session": optional(text(1, 200)),
    "model": optional(text()),
    "attachments": lambda v: v is None or v == [],
    "options": lambda v: v is None or v == {},
    "decision": INT64,
    "satisfied": boolean,
    "limit": optional(integer(1, 1000)),
    "of": optional(text(1, 200)),
    "location": optional(one_of("local", "cloud")),
    "outcome": optional(one_of("ok", "fallback", "escalated", "error", "cancelled", "interrupted", "pending")),
    "since": optional(number(-sys.float_info.max, sys.float_info.max)),  # finite, within a double's range
    "before": optional(integer(1, 2**63 - 1)),
    "options.max_tokens": optional(integer(1, 1048576)),
    "options.temperature": optional(number(0, 2)),
    "options.seed": optional(INT64),
    "options.force": optional(one_of("local", "cloud")),
    "options.stream": optional(boolean),
    "options.queued": optional(boolean),
    "options.stop": optional(stop_sequences),
    "options.top_p": optional(number(0, 1)),
    "options.frequency_penalty": optional(number(-2, 2)),
    "options.presence_penalty": optional(number(-2, 2)),
    "options.response_format": lambda v: v is None,  # no value of the table is one of OpenAI's shapes
    "attachments[0].kind": one_of("image", "document"),
    "attachments[0].name": optional(text()),
    "attachments[0].data": base64_text,  # not null: then neither data nor path is sent
    "attachments[0].path": text(),
    "attachments[0].private": optional(boolean),
}


def swept() -> list[tuple[str, str]]:
    """(op, field path) for every field of every op, as locod.protocol declares them."""
    cells = [(op, name) for op in OPS for name in (*COMMON, *OP_FIELDS.get(op, ()))]
    cells += [("chat", f"options.{name}") for name in OPTIONS]
    return cells + [("chat", f"attachments[0].{f.name}") for f in fields(Attachment)]


def request(op: str, path: str, value: Any) -> dict[str, Any]:
    """A valid ``op`` request (for its id, ``op-path``) with the field at ``path`` set to ``value``."""
    body: dict[str, Any] = {"v": 1, "id": f"{op}-{path}", "op": op, **BASE.get(op, {})}
    if path == "messages":
        del body["prompt"]
    if path.startswith("options."):
        body["options"] = {path.removeprefix("options."): value}
    elif path.startswith("attachments[0]."):
        key = path.removeprefix("attachments[0].")
        attachment = {**DOCUMENT, key: value}
        if key == "path":
            del attachment["data"]
        body["attachments"] = [attachment]
    else:
        body[path] = value
    return body


def verdict(raw: bytes) -> BadRequest | None:
    """What the parser makes of one frame: None when it takes it."""
    try:
        parse_request([raw], 64 << 20)
    except BadRequest as refused:
        return refused
    return None


def expected_code(path: str, value: Any) -> str:
    """The doc's code for a refused value of the field at ``path``."""
    if isinstance(value, str) and "\ud800" in value:
        return "bad_request"
    if path == "prompt" and isinstance(value, str):
        return "empty_prompt"
    return {"v": "unsupported_version", "op": "unknown_op"}.get(path, "bad_field")


def named(message: str, path: str) -> bool:
    """Whether the message names the field: its whole path, or its object's and its own name."""
    return f"'{path}" in message or all(f"'{part}" in message for part in path.rsplit(".", 1))


def held_to_doc(op: str, path: str, value: Any, refused: BadRequest | None) -> str | None:
    """Why the parser's answer breaks the doc's word (None: it keeps it)."""
    accepts = DOC[path](value) and expected_code(path, value) != "bad_request"  # the doc: no surrogate anywhere
    if refused is None:
        return None if accepts else "accepted, where the doc refuses it"
    if accepts:
        return f"refused ({refused.code}: {refused.message[:80]}), where the doc accepts it"
    code = expected_code(path, value)
    if refused.code != code:
        return f"refused {refused.code}, where the doc says {code}"
    if code in ("bad_field", "bad_request") and not named(refused.message, path):
        return f"refused without naming the field: {refused.message[:80]}"
    if refused.request_id != (None if path == "id" else f"{op}-{path}"):  # an id that is not one is not echoed
        return f"the reply's id is {refused.request_id!r:.40}"
    if len(refused.message) > 4096:
        return f"the value is echoed whole ({len(refused.message)} characters)"
    return None


def test_every_field_the_code_declares_has_the_docs_rule() -> None:
    """A field added to locod.protocol is swept only with what the doc says it takes: written here first."""
    assert {path for _, path in swept()} == set(DOC)


def test_the_parser_holds_every_field_to_the_doc_for_every_wrong_value() -> None:
    broken = []
    for op, path in swept():
        for label, value in VALUES.items():
            why = held_to_doc(op, path, value, verdict(json.dumps(request(op, path, value)).encode()))
            if why:
                broken.append(f"{op} {path}={label}: {why}")
    assert broken == []


FRAME_FAULTS: dict[str, tuple[list[bytes], str, str | None]] = {  # frames, code, the reply's id
    "no version": ([b'{"id": "f1", "op": "ping"}'], "unsupported_version", "f1"),
    "two frames": ([b'{"v": 1, "id": "f2", "op": "ping"}'] * 2, "extra_frames", None),
    "not UTF-8": ([b'{"v": 1, "id": "f3", "op": "ping", "secret": "\xff\xfe"}'], "invalid_json", None),
    "a byte-order mark": ([b'\xef\xbb\xbf{"v": 1, "id": "f4", "op": "ping"}'], "invalid_json", None),
    "an array": ([b'[{"v": 1, "id": "f5", "op": "ping"}]'], "not_object", None),
    "a number": ([b"1"], "not_object", None),
    "a string": ([b'"ping"'], "not_object", None),
    "null": ([b"null"], "not_object", None),
    "empty": ([b""], "invalid_json", None),
    "garbage after it": ([b'{"v": 1, "id": "f6", "op": "ping"} {"op": "reload"}'], "invalid_json", None),
    "a key twice": ([b'{"v": 1, "id": "f7", "op": "ping", "op": "reload"}'], "invalid_json", None),
    "nested past the stack": ([b"[" * 100_000 + b"]" * 100_000], "invalid_json", None),
    "a lone surrogate in a key": ([b'{"v": 1, "id": "f8", "op": "ping", "\\udc00": 1}'], "bad_request", "f8"),
    "a lone surrogate in the id": ([b'{"v": 1, "id": "\\ud800", "op": "ping"}'], "bad_request", None),
}


@pytest.mark.parametrize("fault", FRAME_FAULTS)
def test_the_parser_refuses_each_frame_fault_by_its_code(fault: str) -> None:
    frames, code, rid = FRAME_FAULTS[fault]
    with pytest.raises(BadRequest) as refused:
        parse_request(frames, 64 << 20)
    assert (refused.value.code, refused.value.request_id) == (code, rid)


def test_a_lone_surrogate_at_the_end_of_a_wide_list_deep_inside_is_named_by_its_path() -> None:
    """The path is spelt out for the string found only: one built for every item grew with its depth, and
    200,000 items 400 levels down made gigabytes of paths from a message of under a megabyte."""
    depth, width = 400, 200_000
    nested = "[" * depth + "0," * width + '"\\ud800"' + "]" * depth
    raw = f'{{"v": 1, "id": "w", "op": "ping", "x": {{"y": {nested}}}}}'.encode()
    assert len(raw) < 1 << 20
    with pytest.raises(BadRequest) as refused:
        parse_request([raw], 64 << 20)
    where = "x.y" + "[0]" * (depth - 1) + f"[{width}]"
    assert refused.value.code == "bad_request" and repr(where) in refused.value.message


UNKNOWN_KEYS = {
    "a 1 MB field name": {"op": "ping", "k" * (1 << 20): 1},
    "100,000 unknown options": {"op": "chat", "prompt": "hi", "options": {f"k{i}": 1 for i in range(100_000)}},
    "unknown attachment keys": {
        "op": "chat",
        "prompt": "hi",
        "attachments": [{"kind": "image", "path": "/x", **{f"z{i}" * 1000: 1 for i in range(9)}}],
    },
}


@pytest.mark.parametrize("case", UNKNOWN_KEYS)
def test_unknown_keys_are_named_without_being_echoed_whole(case: str) -> None:
    """A refused key was quoted whole, and unknown keys listed all: a 1 MB name came back in a 1 MB reply."""
    with pytest.raises(BadRequest) as refused:
        parse_request([json.dumps({"v": 1, "id": "u", **UNKNOWN_KEYS[case]}).encode()], 64 << 20)
    assert refused.value.code == "bad_field" and len(refused.value.message) < 1000, refused.value.message
    assert "more" in refused.value.message or "characters)" in refused.value.message


# -- over a real daemon's socket ---------------------------------------------------------------------


class Wire(Raw):
    """A raw DEALER that also sends several frames, and reads a reply sent in a REQ socket's envelope."""

    def send_frames(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def until(self, rid: str | None, kinds: tuple[str, ...]) -> None:
        while not any(f["type"] in kinds for f in self.pending[rid]):
            assert self.sock.poll(120_000), f"silence on {rid}: a request went unanswered"
            frame = json.loads(self.sock.recv_multipart()[-1])
            self.pending[frame["id"]].append(frame)


def sample(index: int) -> list[str]:
    """Four of the table's values for the ``index``-th field: across the fields, every value is sent."""
    labels = list(VALUES)
    return [labels[(index * 4 + k) % len(labels)] for k in range(4)]


def sent_over(wire: Wire, op: str, path: str, value: Any) -> str | None:
    """Why the daemon's answer to one cell differs from the parser's verdict (None: it matches); the
    request runs whole when it is accepted (a turn to its done, an op to its result)."""
    body = request(op, path, value)
    if path != "id":  # each request its own id, as the doc asks
        body["id"] = f"{body['id']}-{uuid.uuid4().hex[:8]}"
    raw = json.dumps(body).encode()
    refused = verdict(raw)
    wire.sock.send(raw)
    rid = None if refused is not None and refused.request_id is None else body["id"]
    reply = wire.frames(rid)
    last = reply[-1]
    if refused is not None:
        got = [(f["type"], f.get("code")) for f in reply]
        return None if got == [("error", refused.code)] else f"answered {got}, the parser said {refused.code}"
    if last["type"] == "error" and last["code"] == "internal":
        return f"internal error: {last['message']}"
    return None if last["type"] in LAST else f"ended with {last['type']}"


def turn_served(wire: Wire) -> dict[str, Any]:
    rid = wire.send({"op": "chat", "prompt": "Say hello.", "options": {"max_tokens": 4}})
    return wire.frames(rid)[-1]


def test_a_daemon_answers_every_swept_field_and_frame_fault_and_serves_a_bystander(
    daemon_factory: Any,
) -> None:
    handle: DaemonHandle = daemon_factory({"routing": {"mode": "local"}, "local": {"max_tokens": 4}})
    wire, bystander = Wire(handle.endpoint), Wire(handle.endpoint)
    try:
        assert bystander.ask("ping")["type"] == "result"
        broken = []
        for index, (op, path) in enumerate(swept()):
            for label in sample(index):
                why = sent_over(wire, op, path, VALUES[label])
                if why:
                    broken.append(f"{op} {path}={label}: {why}")
            if index % 10 == 0:
                assert bystander.ask("ping")["type"] == "result"
        for fault, (frames, code, rid) in FRAME_FAULTS.items():
            wire.send_frames(frames)
            got = [(f["type"], f.get("code")) for f in wire.frames(rid)]
            if got != [("error", code)]:
                broken.append(f"{fault}: answered {got}")
        wire.send_frames([b"", b'{"v": 1, "id": "req", "op": "ping"}'])  # a REQ socket's envelope
        assert [(f["type"], f["code"]) for f in wire.frames(None)] == [("error", "extra_frames")]
        assert broken == []
        assert bystander.ask("ping")["type"] == "result"
        assert turn_served(bystander)["type"] == "done"
    finally:
        wire.close()
        bystander.close()
    shown = handle.cli("decisions", "--json")
    assert shown.returncode == 0, shown.stderr
    assert "pending" not in {record["outcome"] for record in json.loads(shown.stdout)}
    assert {row["outcome"] for row in handle.rows()} <= {"ok", "error"}
    log = handle.log()
    assert "Traceback" not in log and "internal error" not in log


def test_an_accepted_value_the_doc_allows_is_run_through_by_the_daemon(daemon_factory: Any) -> None:
    """Values at the doc's edges, accepted by the parser, are served by the daemon too: not an internal error
    later, in the backend or the decision log."""
    handle: DaemonHandle = daemon_factory({"routing": {"mode": "local"}, "local": {"max_tokens": 4}})
    wire = Wire(handle.endpoint)
    edges = [
        {"op": "chat", "prompt": "a\x00b \u202eabc", "session": "\x00\u202e", "id": "\x00\u202e"},
        {"op": "chat", "prompt": "Hi", "options": {"seed": -(2**63), "temperature": 2, "top_p": 0, "stop": ["\x00"]}},
        {"op": "chat", "prompt": "Hi", "options": {"max_tokens": 1048576, "presence_penalty": -2}},
        {"op": "feedback", "decision": 2**63 - 1, "satisfied": False},
        {"op": "decisions", "since": -1e308, "before": 2**63 - 1, "of": "\x00", "session": "\u202e"},
        {"op": "decisions", "since": 2**64, "limit": 1000},
    ]
    try:
        for body in edges:
            last = wire.frames(wire.send(body))[-1]
            assert last["type"] in LAST and last.get("code") != "internal", (body, last)
    finally:
        wire.close()
    assert "Traceback" not in handle.log()


def test_the_http_door_names_the_field_holding_a_lone_surrogate(daemon_factory: Any) -> None:
    """The HTTP door applies the same walk: its 400 said "the body holds ...", with OpenAI's ``param`` null."""
    handle, base = http_daemon(daemon_factory)
    body = b'{"model": "auto", "messages": [{"role": "user", "content": "Hi"}], "stop": ["a", "\\udc00"]}'
    post = urllib.request.Request(f"{base}/v1/chat/completions", data=body, method="POST")
    post.add_header("content-type", "application/json")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(post, timeout=60)
    error = json.loads(refused.value.read())["error"]
    assert (refused.value.code, error["code"], error["param"]) == (400, "bad_request", "stop[1]")
    assert "'stop[1]'" in error["message"] and "surrogate" in error["message"]
    assert handle.rows() == [] and "Traceback" not in handle.log()
