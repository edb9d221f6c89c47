"""Parsing requests: every malformed message is a ProtocolError whose code names the problem."""

from __future__ import annotations

import base64
import json

import pytest

from locod.errors import AttachmentError, ProtocolError
from locod.protocol import (
    Attachment,
    BadRequest,
    ChatOptions,
    ChatRequest,
    DecisionFrame,
    DeltaFrame,
    DoneFrame,
    ErrorFrame,
    EscalatedFrame,
    FallbackFrame,
    FeedbackRequest,
    Frame,
    QueuedFrame,
    RecordQuery,
    Request,
    ResultFrame,
    SimpleRequest,
    decode_frame,
    encode_frame,
    encode_request,
    parse_request,
)


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
    assert req.options.stop == ()
    nulls = parse_request(frame(op="chat", prompt="hi", options={"stop": None, "seed": None}), 10_000)
    assert isinstance(nulls, ChatRequest) and nulls.options.stop == () and nulls.options.seed is None


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
    assert isinstance(simple, SimpleRequest) and simple.query == RecordQuery(limit=5)


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
        (frame(op="chat", prompt="x", options={"stop": "END"}), "bad_field", "r1"),  # a list, as the socket sends
        (frame(op="chat", prompt="x", options={"stop": ["x" * 201]}), "bad_field", "r1"),
        (frame(op="chat", prompt="x", attachments=[{"kind": "image", "data": "%%%"}]), "bad_field", "r1"),
        (frame(op="chat", prompt="x", attachments=[{"kind": "video", "data": ""}]), "bad_field", "r1"),
        (frame(op="chat", messages=[{"role": "assistant", "content": "x"}]), "bad_field", "r1"),
        (frame(op="feedback", decision="3", satisfied=True), "bad_field", "r1"),
        (frame(op="feedback", decision=3, satisfied="yes"), "bad_field", "r1"),
        (frame(op="decisions", location="moon"), "bad_field", "r1"),  # local or cloud
        (frame(op="decisions", outcome="good"), "bad_field", "r1"),
        (frame(op="decisions", session=""), "bad_field", "r1"),
        (frame(op="decisions", since="yesterday"), "bad_field", "r1"),  # a Unix time
        (frame(op="ping") + [b"extra"], "extra_frames", None),
        ([b'{"v": 1, "id": "r1", "op": "ping", "op": "reload"}'], "invalid_json", None),  # which op? neither
        ([json.dumps({"v": True, "id": "r1", "op": "ping"}).encode()], "unsupported_version", "r1"),
        ([json.dumps({"v": 1.0, "id": "r1", "op": "ping"}).encode()], "unsupported_version", "r1"),
        ([json.dumps({"v": 1, "id": "r1", "op": "ping"}).encode("utf-16")], "invalid_json", None),
        ([b"\xef\xbb\xbf" + json.dumps({"v": 1, "id": "r1", "op": "ping"}).encode()], "invalid_json", None),
    ],
)
def test_malformed(frames: list[bytes], code: str, rid: str | None) -> None:
    assert code_of(frames) == (code, rid)


def test_too_large() -> None:
    assert code_of(frame(op="chat", prompt="x" * 2000), max_bytes=1000)[0] == "too_large"


def test_too_large_keeps_the_id_read_from_the_head() -> None:
    """The frame is not parsed, but its id is read where encode_request writes it: the client waiting on
    that id hears why instead of waiting out its timeout."""
    big = ChatRequest("a1b2", [{"role": "user", "content": "x" * 2000}], None, None, [], ChatOptions(), None)
    assert code_of([encode_request(big)], max_bytes=1000) == ("too_large", "a1b2")
    assert code_of([b'{"id": "first", "v": 1, "op": "ping", "pad": "' + b"x" * 2000 + b'"}'], 1000)[1] == "first"
    assert code_of([b'{"op": "ping", "id": "late", "pad": "' + b"x" * 2000 + b'"}'], 1000)[1] is None


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    assert code_of([b"[" * 100_000 + b"]" * 100_000], max_bytes=1 << 20)[0] in ("invalid_json", "not_object")


# -- both ends share the code: every request and frame round-trips ---------------------------------------

FRAMES = [
    DecisionFrame(7, "cloud", "gpt-mini", "the rule", ["photo.png"], explored=False),
    DeltaFrame("Hello, "),
    FallbackFrame(7, "smollm2", "cloud_http", "the cloud answer failed; answering locally"),
    DoneFrame(7, "s1", "ok", "local", "smollm2", 12, 3, 0.0, 41.5, 9.25),
    DoneFrame(7, "s1", "fallback", "local", "smollm2", 12, 3, 0.0001, 41.5, None, text="whole answer"),
    ErrorFrame("bad_attachment", "bad_image", "image 'x.png': not a supported image"),
    ErrorFrame("busy", "cancelled", "the client disconnected", decision=7),
    ResultFrame("status", {"pid": 1, "routing": {"q": 0.5}}),
    EscalatedFrame(7, "gpt-mini", 0.31, "the local answer was not sure enough; gpt-mini answers instead"),
    QueuedFrame(2),
]


@pytest.mark.parametrize("sent", FRAMES, ids=lambda f: f.type)
def test_every_frame_round_trips(sent: Frame) -> None:
    rid, received = decode_frame(encode_frame("r1", sent))
    assert rid == "r1" and received == sent


def test_optional_frame_fields_stay_off_the_wire() -> None:
    """Version 1's wire format: `text` only in a non-streamed `done`, `decision` only in an accepted turn's
    error."""
    assert "text" not in json.loads(encode_frame("r", FRAMES[3]))
    assert json.loads(encode_frame("r", FRAMES[4]))["text"] == "whole answer"
    assert "decision" not in json.loads(encode_frame("r", FRAMES[5]))
    assert json.loads(encode_frame("r", FRAMES[0])) == {
        "v": 1,
        "id": "r",
        "type": "decision",
        "decision": 7,
        "location": "cloud",
        "model": "gpt-mini",
        "reason": "the rule",
        "attachments_sent": ["photo.png"],
        "explored": False,
    }


def test_an_error_frame_becomes_the_matching_exception() -> None:
    _, frame = decode_frame(encode_frame("r", FRAMES[5]))
    assert isinstance(frame, ErrorFrame)
    error = frame.error()
    assert isinstance(error, AttachmentError) and error.code == "bad_image"


def test_unreadable_reply_frames_are_a_protocol_error() -> None:
    for raw in (b"not json", b'{"type": "nonsense"}', b'{"type": "delta"}', b"[]"):
        with pytest.raises(ProtocolError):
            decode_frame(raw)


REQUESTS = [
    ChatRequest("c1", [{"role": "user", "content": "hi"}]),
    ChatRequest(
        "c2",
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Look"}],
        session="s",
        model="gpt-mini",
        attachments=[
            Attachment("image", "a.png", data=b"\x89PNG", private=True),
            Attachment("document", "notes.md", path="/home/u/notes.md"),
        ],
        options=ChatOptions(
            max_tokens=5, temperature=0.0, seed=3, force="cloud", stream=False, queued=True, stop=("\n\n", "END")
        ),
        secret="s3cret",
    ),
    FeedbackRequest("f1", 42, False),
    SimpleRequest("d1", "decisions", query=RecordQuery(limit=5)),
    SimpleRequest("d2", "decisions", query=RecordQuery(3, "17", "work", "cloud", "fallback", 1_764_300_000.5)),
    SimpleRequest("p1", "ping"),
]


@pytest.mark.parametrize("sent", REQUESTS, ids=lambda r: r.id)
def test_every_request_round_trips(sent: Request) -> None:
    assert parse_request([encode_request(sent)], 10_000) == sent
