"""Walk 43: a developer writing a locod client in another language, from docs/protocol.md alone, with a raw
ZeroMQ DEALER: every op, every frame, the error codes, two dialogues on one connection, a cancel, a reused id,
a restart under an open connection. What the doc did not say, or said wrong, is pinned here the way that
client talks: raw JSON frames over a real socket to a real daemon (the embedded model)."""

from __future__ import annotations

import base64
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from locod.client import Client
from locod.errors import ProtocolError

from .conftest import CloudServer, Context, DaemonHandle, cloud_config
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


def test_an_unnamed_attachment_s_name_and_a_secret_sent_over_ipc_are_as_the_doc_says(raw: Raw) -> None:
    """Walk finding: the doc gave an unnamed attachment the name `attachment-N` without saying from which N
    (a client matching refusals and `attachments_sent` to its files needs it: the first is `attachment-0`),
    and said a `secret` is required on a tcp endpoint, not what the ipc socket does with one (ignores it)."""
    text = base64.b64encode(b"The secret word is tangerine.").decode()
    unnamed = [{"kind": "document", "data": text}, {"kind": "document", "data": ""}]
    refused = raw.ask("chat", prompt="What is the word?", attachments=unnamed)
    assert (refused["code"], refused["message"]) == ("bad_attachment", "attachment 'attachment-1' is empty")
    assert raw.ask("ping", secret="not the tcp endpoint's")["data"]["pong"] is True
    doc = " ".join(PROTOCOL.split())
    assert "default `attachment-N`, N its place in the list from 0" in doc
    assert "one sent there is ignored, right or wrong" in doc


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


def test_a_restarted_daemon_answers_the_open_connection_and_forgets_its_sessions(
    ctx: Context, daemon_factory: Any
) -> None:
    """Walk finding: after a restart under an open connection, a turn naming the session it had continued
    answered as a new dialogue (no history, turn 0 again) without a word, while the doc said each turn
    "takes the next turn number in the decisions table". The doc now says a session lives in memory only,
    and how a client can tell. What it said already holds too: a request sent while the daemon is down
    waits in ZeroMQ's queue and is answered by the daemon that comes back, on the same connection."""
    handle = daemon_factory()
    raw = Raw(ctx, handle.endpoint)
    ask = {"prompt": "My name is Zorblax. Say hi.", "options": {"max_tokens": 2, "force": "local"}}
    before = raw.ask("ping")["data"]["pid"]
    first = raw.ask("chat", session="R", **ask)
    assert first["type"] == "done", first
    handle.stop()

    waiting = raw.send("ping")
    again = daemon_factory()  # the same home and socket path: the user's daemon started again
    assert again.endpoint == handle.endpoint
    answered = raw.until_end(waiting)[-1]
    assert answered["type"] == "result" and answered["data"]["pid"] not in (before, None), answered

    second = raw.ask("chat", session="R", **ask)
    fresh = raw.ask("chat", session="another", **ask)
    assert second["type"] == "done" and second["session"] == "R", second
    assert second["tokens_in"] == fresh["tokens_in"] == first["tokens_in"], "no history: a new dialogue"
    turns = again.rows("SELECT turn FROM decisions WHERE session = 'R' ORDER BY id")
    assert [row["turn"] for row in turns] == [0, 0]
    sessions = section(PROTOCOL, "Sessions")
    assert "A session lives in the daemon's memory only: when the daemon restarts" in " ".join(sessions.split())


QUEUED = {"max_tokens": 2, "queued": True}
STORY = "Tell me, in many words, the story of a lighthouse keeper and the storm that came. " * 20


def test_a_lone_client_may_wait_behind_the_daemon_s_own_shadow_answer(
    ctx: Context, daemon_factory: Any, cloud_server: CloudServer
) -> None:
    """Walk finding: a client with nothing else in flight asked for `queued` frames and was told `"ahead": 1`
    right after a cloud turn, while the doc said the local model is held by "another turn": it was the
    daemon's shadow answer to that cloud turn (`routing.shadow`), which gives way at its next token. The doc
    now says so. The shadow is offered once the cloud turn's `done` is sent, so a turn sent at once may
    (rarely) come first: a few tries."""
    config = cloud_config(cloud_server.base_url, timeout_s=60.0)
    config["routing"]["shadow"] = "always"
    raw = Raw(ctx, daemon_factory(config).endpoint)
    for _ in range(5):
        cloud = raw.ask("chat", prompt=STORY, options={"max_tokens": 48, "force": "cloud", "temperature": 0})
        assert (cloud["type"], cloud["location"]) == ("done", "cloud"), cloud
        local = raw.until_end(raw.send("chat", prompt="hi", options={**QUEUED, "force": "local"}))
        if local[0]["type"] == "queued":
            break
    assert local[0]["ahead"] == 1 and local[-1]["type"] == "done", local
    queued = " ".join(section(PROTOCOL, "Requests").split())
    assert "The one generating may be the daemon's own: a shadow answer to an earlier cloud turn" in queued


class FakeEnd:
    """A daemon end (a real ZeroMQ ROUTER) that answers each request with the frames given for it, in turn."""

    def __init__(self, path: Path, answers: list[list[dict[str, Any]]]) -> None:
        self.router: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(f"ipc://{path}")
        self.address = f"ipc://{path}"
        self.answers = answers
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for frames in self.answers:
            peer, body = self.router.recv_multipart()
            rid = json.loads(body)["id"]
            for frame in frames:
                self.router.send_multipart([peer, json.dumps({"v": 1, "id": rid, **frame}).encode()])

    def close(self) -> None:
        self.thread.join(10)
        self.router.close(linger=0)


@pytest.fixture
def fake_end(tmp_path: Path) -> Iterator[FakeEnd]:
    (tmp_path / "run").mkdir(mode=0o700)
    later_field = {"type": "result", "op": "ping", "data": {"pong": True}, "served_by": "a later daemon"}
    unknown_type = {"type": "progress", "percent": 50}
    end = FakeEnd(tmp_path / "run" / "locod.sock", [[later_field], [unknown_type]])
    yield end
    end.close()


def test_a_field_a_client_does_not_know_is_read_past_and_a_frame_type_refused(fake_end: FakeEnd) -> None:
    """Walk finding: the doc said a daemon of protocol 1 sends no frame type it does not list, but not what
    a client does with a field it does not list, which later daemons of protocol 1 have added (`finish_reason`,
    `cost_estimated`, `notice`): a client refusing unknown fields breaks on the next upgrade. The doc now says
    to read past them, as `locod.client` does, and that `locod.client` refuses an unknown type, `bad_reply`."""
    with Client(fake_end.address, timeout_s=20) as client:
        assert client.ping() == {"pong": True}
        with pytest.raises(ProtocolError) as refused:
            client.ping()
    assert refused.value.code == "bad_reply"
    reading = " ".join(PROTOCOL.split("**Reading replies.**")[1].split("### `chat`")[0].split())
    assert "a client reads the fields it knows and ignores the rest, as `locod.client` does" in reading
    assert "`locod.client` refuses it (`bad_reply`)" in reading
