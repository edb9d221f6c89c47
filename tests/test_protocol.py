"""Parsing requests: every malformed message is a ProtocolError whose code names the problem."""

from __future__ import annotations

import base64
import json

import pytest

from locod.protocol import BadRequest, ChatRequest, FeedbackRequest, SimpleRequest, parse_request


def frame(**fields: object) -> list[bytes]:
    return [json.dumps({"v": 1, "id": "r1", **fields}).encode()]


def code_of(frames: list[bytes], max_bytes: int = 10_000) -> tuple[str, str | None]:
    with pytest.raises(BadRequest) as info:
        parse_request(frames, max_bytes)
    return info.value.code, info.value.request_id


def test_chat_with_prompt_and_options() -> None:
    req = parse_request(frame(op="chat", prompt="hi", session="s", options={"max_tokens": 5, "force": "local"}), 10_000)
    assert isinstance(req, ChatRequest)
    assert req.messages == [{"role": "user", "content": "hi"}]
    assert req.session == "s" and req.options.max_tokens == 5 and req.options.force == "local"


def test_attachment_bytes_are_base64() -> None:
    data = base64.b64encode(b"hello").decode()
    req = parse_request(
        frame(
            op="chat", prompt="x", attachments=[{"kind": "document", "name": "a.txt", "data": data, "private": True}]
        ),
        10_000,
    )
    assert isinstance(req, ChatRequest)
    assert req.attachments[0].data == b"hello" and req.attachments[0].private


def test_other_ops() -> None:
    assert isinstance(parse_request(frame(op="feedback", decision=3, satisfied=True), 10_000), FeedbackRequest)
    simple = parse_request(frame(op="decisions", limit=5), 10_000)
    assert isinstance(simple, SimpleRequest) and simple.limit == 5


@pytest.mark.parametrize(
    ("frames", "code", "rid"),
    [
        ([b"\xff\xfe not json"], "invalid_json", None),
        ([b"[1, 2]"], "not_object", None),
        ([b'{"v": 1, "op": "ping"}'], "bad_field", None),
        (frame(op="dance"), "unknown_op", "r1"),
        ([json.dumps({"v": 99, "id": "r1", "op": "ping"}).encode()], "unsupported_version", "r1"),
        (frame(op="chat", prompt="   "), "empty_prompt", "r1"),
        (frame(op="chat", prompt=7), "bad_field", "r1"),
        (frame(op="chat"), "bad_field", "r1"),
        (frame(op="chat", prompt="x", options={"force": "moon"}), "bad_field", "r1"),
        (frame(op="chat", prompt="x", options={"max_tokens": True}), "bad_field", "r1"),
        (frame(op="chat", prompt="x", attachments=[{"kind": "image", "data": "%%%"}]), "bad_field", "r1"),
        (frame(op="chat", prompt="x", attachments=[{"kind": "video", "data": ""}]), "bad_field", "r1"),
        (frame(op="chat", messages=[{"role": "assistant", "content": "x"}]), "bad_field", "r1"),
        (frame(op="feedback", decision="3", satisfied=True), "bad_field", "r1"),
        (frame(op="feedback", decision=3, satisfied="yes"), "bad_field", "r1"),
        (frame(op="ping") + [b"extra"], "extra_frames", None),
    ],
)
def test_malformed(frames: list[bytes], code: str, rid: str | None) -> None:
    assert code_of(frames) == (code, rid)


def test_too_large() -> None:
    assert code_of(frame(op="chat", prompt="x" * 2000), max_bytes=1000)[0] == "too_large"


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    assert code_of([b"[" * 100_000 + b"]" * 100_000], max_bytes=1 << 20)[0] in ("invalid_json", "not_object")
