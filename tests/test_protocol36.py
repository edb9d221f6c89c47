"""A client written from docs/protocol.md alone, as one in another language would be: a bare DEALER socket and
JSON frames, neither locod.client nor locod.protocol. Each assertion is something the doc promises a client,
so a change that breaks one breaks the doc's word (or the doc must change with it)."""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import zmq

from .conftest import DaemonHandle, wait_for
from .faultproxy import Fault, FaultProxy
from .test_escalation import _daemon, _head

LOCAL, CLOUD = "smollm2-135m-instruct", "cloud-small"
LAST = ("done", "error", "result")  # docs/protocol.md, Replies: each request's replies end with one of these
ENVELOPE = {"v": int, "id": str, "type": str}
DECISION = {"decision": int, "location": str, "model": str, "reason": str, "attachments_sent": list, "explored": bool}
DONE = {
    "decision": int,
    "session": str,
    "outcome": str,
    "location": str,
    "model": str,
    "tokens_in": int,
    "tokens_out": int,
    "cost_usd": (int, float),
    "latency_ms": (int, float),
    "first_token_ms": (int, float, type(None)),
}
FALLBACK = {"decision": int, "model": str, "cause": str, "message": str}
ESCALATED = {"decision": int, "model": str, "confidence": (int, float), "message": str}
ERROR = {"id": (str, type(None)), "kind": str, "code": str, "message": str}  # id null: it could not be read
RESULT = {"op": str}


class Raw:
    """One DEALER connection; replies are sorted by the request id they echo, as the doc's example does."""

    def __init__(self, endpoint: str, routing_id: bytes | None = None) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if routing_id is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, routing_id)
        self.sock.connect(endpoint)
        self.pending: dict[str | None, list[dict[str, Any]]] = defaultdict(list)

    def send(self, body: dict[str, Any], raw: bytes | None = None) -> str:
        rid = body.get("id") or uuid.uuid4().hex
        self.sock.send(raw if raw is not None else json.dumps({"v": 1, "id": rid, **body}).encode())
        return str(rid)

    def until(self, rid: str | None, kinds: tuple[str, ...]) -> None:
        """Read until request ``rid`` has had a frame of one of ``kinds``; frames of every request are kept."""
        while not any(f["type"] in kinds for f in self.pending[rid]):
            assert self.sock.poll(120_000), f"silence on {rid}"
            frame = json.loads(self.sock.recv())
            self.pending[frame["id"]].append(frame)

    def frames(self, rid: str | None) -> list[dict[str, Any]]:
        """Every frame of request ``rid`` up to its last (the doc: each request's replies end with one)."""
        self.until(rid, LAST)
        return self.pending.pop(rid)

    def ask(self, op: str, **fields: Any) -> dict[str, Any]:
        (reply,) = self.frames(self.send({"op": op, **fields}))
        return reply

    def close(self) -> None:
        self.sock.close(linger=0)


def shaped(frame: dict[str, Any], fields: dict[str, Any], optional: dict[str, Any] | None = None) -> None:
    """``frame`` carries the envelope and ``fields`` with their types; nothing else but ``optional``."""
    for name, kind in {**ENVELOPE, **fields}.items():
        assert typed(frame.get(name), kind), (name, frame)
    assert frame["v"] == 1
    extra = set(frame) - set(ENVELOPE) - set(fields)
    assert extra <= set(optional or {}), (extra, frame)
    for name in extra:  # an optional field is left out, never null
        assert typed(frame[name], (optional or {})[name]), (name, frame)


def typed(value: Any, kind: Any) -> bool:
    """JSON's types as the doc names them: a boolean is no number, a number no boolean."""
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def turn(frames: list[dict[str, Any]], rid: str) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """(decision, delta texts, done) of a turn that went decision, deltas, done; every frame echoes ``rid``."""
    assert all(f["id"] == rid and f["v"] == 1 for f in frames)
    types = [f["type"] for f in frames]
    assert types == ["decision", *["delta"] * (len(types) - 2), "done"], types
    shaped(frames[0], DECISION, {"notice": str})
    for delta in frames[1:-1]:
        shaped(delta, {"text": str})
    shaped(frames[-1], DONE, {"text": str, "cost_estimated": bool, "finish_reason": str})
    assert frames[-1]["decision"] == frames[0]["decision"]
    return frames[0], [f["text"] for f in frames[1:-1]], frames[-1]


def chat(raw: Raw, **fields: Any) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    rid = raw.send({"op": "chat", **fields})
    return turn(raw.frames(rid), rid)


def error(reply: dict[str, Any], kind: str, code: str) -> None:
    shaped(reply, ERROR)
    assert (reply["type"], reply["kind"], reply["code"]) == ("error", kind, code), reply


def result(reply: dict[str, Any], op: str) -> Any:
    shaped(reply, {**RESULT, "data": object})
    assert reply["op"] == op
    return reply["data"]


def test_a_raw_client_holds_the_daemon_to_every_local_promise_of_the_doc(daemon: DaemonHandle) -> None:
    raw, started = Raw(daemon.endpoint), time.time()
    ping = result(raw.ask("ping"), "ping")
    assert ping["pong"] is True and set(ping["decisions_narrowing"]) == {"session", "location", "outcome", "since"} | {
        "before"
    }
    # One-off streamed turn: decision, deltas, done; its session is the id the daemon gave it.
    decision, texts, done = chat(raw, prompt="Say hello.", options={"max_tokens": 8, "temperature": 0.0})
    assert decision["location"] == "local" and decision["model"] == LOCAL and decision["attachments_sent"] == []
    assert re.fullmatch(r"anon-[0-9a-f]{12}", done["session"]) and done["outcome"] == "ok"
    assert texts and "text" not in done and done["tokens_out"] >= 1
    # A session, options (not streamed: the answer is done's text), and an attachment.
    options = {"max_tokens": 6, "temperature": 0.0, "seed": 7, "stream": False, "stop": ["\n\n"], "top_p": 0.9}
    _, texts, first = chat(raw, prompt="Name a colour.", session="s36", options=options)
    assert texts == [] and isinstance(first["text"], str) and first["session"] == "s36"
    note = {"kind": "document", "name": "note.txt", "data": base64.b64encode(b"The sky is green here.").decode()}
    decision, _, second = chat(raw, prompt="The sky's colour?", session="s36", attachments=[note], options=options)
    assert second["session"] == "s36" and decision["attachments_sent"] == []  # local: nothing uploaded
    # A null field is the field left out: a one-off turn, default options.
    _, _, nulled = chat(raw, prompt="Hi", session=None, model=None, options={"max_tokens": 2, "seed": None})
    assert nulled["session"].startswith("anon-")
    # feedback: a result, then a label is final.
    label = result(raw.ask("feedback", decision=first["decision"], satisfied=True), "feedback")
    assert label["decision"] == first["decision"] and label["satisfied"] is True
    error(raw.ask("feedback", decision=first["decision"], satisfied=False), "unknown_decision", "already_labelled")
    error(raw.ask("feedback", decision=first["decision"], satisfied=1), "protocol", "bad_field")
    # decisions: each narrowing field narrows.
    ids = lambda data: [r["id"] for r in data]  # noqa: E731
    (record,) = result(raw.ask("decisions", of=str(second["decision"])), "decisions")
    assert (record["session"], record["outcome"], record["location"], record["backend"]) == ("s36", "ok") + (
        "local",
    ) * 2
    assert ids(result(raw.ask("decisions", session="s36"), "decisions")) == [second["decision"], first["decision"]]
    assert ids(result(raw.ask("decisions", limit=1), "decisions")) == [nulled["decision"]]
    assert ids(result(raw.ask("decisions", of=str(done["decision"])), "decisions")) == [done["decision"]]
    assert len(result(raw.ask("decisions", location="local", outcome="ok", since=started), "decisions")) == 4
    assert result(raw.ask("decisions", location="cloud"), "decisions") == []
    assert ids(result(raw.ask("decisions", before=first["decision"]), "decisions")) == [done["decision"]]
    error(raw.ask("decisions", outcome="great"), "protocol", "bad_field")
    # status, config, reload.
    status = result(raw.ask("status"), "status")
    assert status["pid"] == ping["pid"] and status["queue"]["in_flight"] == 0
    assert result(raw.ask("config"), "config")["pid"] == ping["pid"]
    reloaded = result(raw.ask("reload"), "reload")
    assert reloaded["reloaded"] is True and reloaded["error"] is None
    raw.close()


def test_requests_on_one_connection_overlap_and_each_ends_with_one_last_frame(daemon: DaemonHandle) -> None:
    raw = Raw(daemon.endpoint)
    story = {"max_tokens": 160, "temperature": 0.0, "queued": True}
    slow = raw.send({"op": "chat", "prompt": "Write a long story about a dragon.", "options": story})
    raw.until(slow, ("decision",))  # it holds the local model now: the next turn waits behind it
    queued = raw.send({"op": "chat", "prompt": "Hi", "options": {"max_tokens": 2, "queued": True}})
    pinged = raw.send({"op": "ping"})  # answered by the serving loop, whatever the turns are doing
    result(raw.frames(pinged)[0], "ping")
    turn(raw.frames(slow), slow)
    waited = raw.frames(queued)
    assert waited[0]["type"] == "queued" and waited[0]["ahead"] == 1
    shaped(waited[0], {"ahead": int})
    turn([f for f in waited if f["type"] != "queued"], queued)
    assert [f["type"] for f in waited].index("decision") > max(i for i, f in enumerate(waited) if f["type"] == "queued")
    # Errors: the envelope; the id echoed once it could be read (before `v` is looked at), else null.
    error(raw.ask("dance"), "protocol", "unknown_op")
    raw.send({}, json.dumps({"v": 2, "id": "old", "op": "ping"}).encode())
    error(raw.frames("old")[0], "protocol", "unsupported_version")
    for version in ({}, {"v": True}, {"v": 1.0}):
        raw.send({}, json.dumps({"id": "nov", "op": "ping", **version}).encode())
        error(raw.frames("nov")[0], "protocol", "unsupported_version")
    raw.send({}, json.dumps({"v": 1, "id": 5, "op": "ping"}).encode())
    error(raw.frames(None)[0], "protocol", "bad_field")
    raw.send({}, b"{not json")
    error(raw.frames(None)[0], "protocol", "invalid_json")
    error(raw.ask("chat", prompt="Hi", sesion="s"), "protocol", "bad_field")
    error(raw.ask("chat", prompt="Hi", max_tokens=3), "protocol", "bad_field")
    error(raw.ask("chat", prompt="   "), "protocol", "empty_prompt")
    error(raw.ask("chat", prompt="Hi", messages=[{"role": "user", "content": "Hi"}]), "protocol", "bad_field")
    error(raw.ask("chat", prompt=None, messages=[{"role": "user", "content": "Hi"}]), "protocol", "bad_field")
    error(raw.ask("chat", prompt="Hi", model="nope"), "unknown_model", "unknown_model")
    raw.close()


def test_closing_the_connection_cancels_its_turn(daemon: DaemonHandle) -> None:
    leaving, watcher = Raw(daemon.endpoint), Raw(daemon.endpoint)
    rid = leaving.send({"op": "chat", "prompt": "Write a long story.", "options": {"max_tokens": 400}})
    leaving.until(rid, ("decision",))
    (decision,) = leaving.pending[rid]
    leaving.close()  # the doc's cancel: close with linger 0

    def outcome() -> str:
        (record,) = result(watcher.ask("decisions", of=str(decision["decision"])), "decisions")
        return str(record["outcome"])

    wait_for(lambda: outcome() == "cancelled", 60, "the turn to be cancelled")
    watcher.close()


def test_a_raw_client_reads_escalations_and_fallbacks(daemon_factory: Any, tmp_path: Path, proxy: FaultProxy) -> None:
    # A local answer whose confidence head is never sure: the turn escalates (tests/test_escalation.py).
    handle = _daemon(daemon_factory, tmp_path, proxy, _head(min_weight=1000.0, bias=10.0), "unsure")
    raw = Raw(handle.endpoint)
    rid = raw.send({"op": "chat", "prompt": "What is the plural of mouse?", "options": {"max_tokens": 24}})
    frames = raw.frames(rid)
    types = [f["type"] for f in frames]
    assert types == ["decision", "escalated", *["delta"] * (len(types) - 3), "done"], types  # no local text
    shaped(frames[1], ESCALATED, {"notice": str})
    assert "escalates to" in frames[0]["reason"] and frames[0]["location"] == "local"
    assert frames[1]["model"] == CLOUD and frames[1]["decision"] == frames[0]["decision"]
    shaped(frames[-1], DONE, {"cost_estimated": bool, "finish_reason": str})
    assert (frames[-1]["outcome"], frames[-1]["location"], frames[-1]["model"]) == ("escalated", "cloud", CLOUD)
    proxy.set(Fault(kind="status", status=500))  # every try fails: the local model answers from the start
    rid = raw.send({"op": "chat", "prompt": "Say hi.", "options": {"max_tokens": 6, "force": "cloud"}})
    frames = raw.frames(rid)
    types = [f["type"] for f in frames]
    assert types[0] == "decision" and frames[0]["location"] == "cloud" and types[-1] == "done", types
    assert types.count("fallback") == 1 and set(types[1:-1]) <= {"delta", "fallback"}, types
    fallback = frames[types.index("fallback")]
    shaped(fallback, FALLBACK)
    assert fallback["cause"] == "cloud_http" and fallback["decision"] == frames[0]["decision"]
    assert (frames[-1]["outcome"], frames[-1]["location"], frames[-1]["model"]) == ("fallback", "local", LOCAL)
    raw.close()


def test_a_routing_id_in_use_is_not_answered_and_a_fresh_one_is(daemon: DaemonHandle) -> None:
    named = Raw(daemon.endpoint, routing_id=b"client-36")
    result(named.ask("ping"), "ping")
    twin = Raw(daemon.endpoint, routing_id=b"client-36")  # dropped by ZeroMQ: the id is taken
    twin.send({"op": "ping"})
    fresh = Raw(daemon.endpoint)  # whose routing id ZeroMQ makes up
    result(fresh.ask("ping"), "ping")
    assert not twin.sock.poll(2000)
    result(named.ask("ping"), "ping")  # the first holder keeps its connection
    for raw in (twin, fresh, named):
        raw.close()
