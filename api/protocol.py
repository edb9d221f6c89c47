"""The wire protocol, shared by the daemon and the client (docs/protocol.md is its prose).

One JSON object per ZeroMQ message. A request carries ``v`` (protocol version), ``id`` (chosen by the
client, echoed in every reply) and ``op``. Replies carry ``v``, ``id`` and ``type``: ``decision``, ``delta``,
``done`` for a chat turn (with ``fallback`` or ``escalated`` between, when the answer changes hands, and
``queued`` before, when the request asked for it);
``result`` for the other ops; ``error`` (``kind``, ``code``, ``message``) for any.
Both ends use the same dataclasses: the client encodes requests with ``encode_request`` and decodes reply
frames with ``decode_frame``; the daemon parses requests with ``parse_request`` (a ``ProtocolError`` naming
what is wrong) and encodes frames with ``encode_frame``. Every frame type is declared once, here.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, NoReturn

from locod import __version__
from locod.errors import LocodError, ProtocolError, from_frame
from locod.words import listed, quoted

PROTOCOL_VERSION = 1
OPS = ("chat", "feedback", "status", "decisions", "ping", "reload", "config")
READ_ONLY_OPS = ("status", "decisions", "ping", "config")  # change nothing: sent twice, answered the same
ROLES = ("system", "user", "assistant")
FORCE = ("local", "cloud")
QUEUED_EVERY_S = 30.0  # a turn waiting for the local model is told again at least this often (``queued``)
NO_CONFIG_FILE = "(defaults)"  # the source a daemon reports (reload, config show) when it read no config file
ATTACHMENT_KINDS = ("image", "document")
OPTIONS = (  # a chat request's
    "max_tokens",
    "temperature",
    "seed",
    "force",
    "stream",
    "queued",
    "stop",
    "top_p",
    "frequency_penalty",
    "presence_penalty",
    "response_format",
)
# JSON escapes of a UTF-16 surrogate: only a message holding one needs the walk for lone surrogates.
LONE_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
SURROGATE = re.compile("[\ud800-\udfff]")
# The id of a frame too large to parse, read from its head where encode_request writes it ({"v":1,"id":...},
# or id first): without it the error reply carries no id, and the client waiting on one never hears why.
HEAD_ID = re.compile(rb'\s*\{\s*(?:"v"\s*:\s*\d+\s*,\s*)?"id"\s*:\s*"([A-Za-z0-9_.:-]{1,200})"')
INT64 = range(-(2**63), 2**63)
# Chat options as both doors take them (the socket's `options`, the HTTP body's fields): one rule each.
OPTION_RULES: dict[str, tuple[type, float, float, str]] = {
    "max_tokens": (int, 1, 1 << 20, "an integer between 1 and 1048576"),
    "temperature": (float, 0.0, 2.0, "a number between 0 and 2"),
    "seed": (int, -(2**63), 2**63 - 1, "an integer that fits 64 bits (signed)"),
    "top_p": (float, 0.0, 1.0, "a number between 0 and 1"),
    "frequency_penalty": (float, -2.0, 2.0, "a number between -2 and 2"),
    "presence_penalty": (float, -2.0, 2.0, "a number between -2 and 2"),
}
# OpenAI's response formats: plain text (the default), any JSON object, or JSON following a schema.
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
# OpenAI's json_schema keys: a local answer is held to the schema whether or not strict is sent, and the
# description (the schema's meaning, for the model) is passed to a cloud model as given
JSON_SCHEMA_KEYS = ("name", "schema", "strict", "description")
JSON_SCHEMA_TYPES = {"name": str, "description": str, "strict": bool}  # each also null: not sent
JSON_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for json_schema.name, which it requires
# Stop sequences: as many as OpenAI's API takes, each bounded (every generated token is checked against them).
MAX_STOP_SEQUENCES, MAX_STOP_CHARS = 4, 200
MAX_ID_CHARS = 200  # a session id, or the id or request id `decisions` looks up


@dataclass(frozen=True)
class Attachment:
    kind: str
    name: str
    data: bytes | None = None
    path: str | None = None
    private: bool = False


@dataclass(frozen=True)
class ChatOptions:
    max_tokens: int | None = None
    temperature: float | None = None  # None: a local model's DEVICE_TEMPERATURE, a cloud endpoint's own default
    seed: int | None = None
    force: str | None = None
    stream: bool = True
    queued: bool = False  # send ``queued`` frames while the turn waits for the local model (opt-in: new frames)
    stop: tuple[str, ...] = ()  # the answer ends before the first of these (not included)
    top_p: float | None = None  # None, here and in the penalties: the answering model's own setting
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    # OpenAI's shape, {"type": "json_object"} or {"type": "json_schema", "json_schema": {...}}; None: text
    response_format: dict[str, Any] | None = None


@dataclass(frozen=True)
class ChatRequest:
    id: str
    messages: list[dict[str, str]]
    session: str | None = None
    model: str | None = None
    attachments: list[Attachment] = field(default_factory=list)
    options: ChatOptions = field(default_factory=ChatOptions)
    secret: str | None = None
    op: ClassVar[str] = "chat"

    @property
    def prompt(self) -> str:
        """The text of the last user message: what this turn asks."""
        return self.messages[-1]["content"]


@dataclass(frozen=True)
class FeedbackRequest:
    id: str
    decision: int
    satisfied: bool
    secret: str | None = None
    op: ClassVar[str] = "feedback"


# Where a completed turn can end (the decisions table's ``outcome``): ``pending`` until it is completed, and
# ``interrupted`` when the daemon stopped during it (set at the next start).
OUTCOMES = ("ok", "fallback", "escalated", "error", "cancelled", "interrupted", "pending")
LOCATIONS = ("local", "cloud")
# The ``decisions`` op's fields that narrow which records it answers (all of RecordQuery's but ``limit`` and
# ``of``, which every daemon reads): a daemon lists those it applies in its ``ping``, as one older than them
# ignored them and answered the newest records unfiltered.
NARROWING = ("session", "location", "outcome", "since", "before")
# The fields each op takes besides ``v``, ``id``, ``op`` and ``secret``; any other is refused, naming it.
# Ignored, a misspelt ``sesion`` made a one-off turn, a ``max_tokens`` beside ``options`` (where OpenAI's API
# has it) went unread, and a ``decisions`` field this daemon does not narrow by answered the newest records.
OP_FIELDS: dict[str, tuple[str, ...]] = {
    "chat": ("prompt", "messages", "session", "model", "attachments", "options"),
    "feedback": ("decision", "satisfied"),
    "decisions": ("limit", "of", *NARROWING),
}


@dataclass(frozen=True)
class RecordQuery:
    """Which decision records the ``decisions`` op answers with, newest first: at most ``limit``, only ``of``'s
    (a decision id or a request id), and only those of ``session``, answered at ``location`` (where the turn
    ran in the end, after a fallback or an escalation), ending in ``outcome``, accepted at or after ``since``
    (Unix time), with an id below ``before`` (the page before one whose oldest id it is); each left None matches
    every record."""

    limit: int = 20
    of: str | None = None
    session: str | None = None
    location: str | None = None
    outcome: str | None = None
    since: float | None = None
    before: int | None = None

    def narrowing(self) -> tuple[str, ...]:
        """The narrowing fields given (``NARROWING``): those a daemon must apply for its answer to hold only
        the records asked for."""
        return tuple(name for name in NARROWING if getattr(self, name) is not None)


@dataclass(frozen=True)
class SimpleRequest:
    """``status``, ``ping``, ``reload``, ``config`` and ``decisions`` (with ``query``: which records)."""

    id: str
    op: str
    secret: str | None = None
    query: RecordQuery = RecordQuery()


Request = ChatRequest | FeedbackRequest | SimpleRequest


class BadRequest(ProtocolError):
    """A ProtocolError that knows the request id, when one could be read, so the reply can carry it."""

    def __init__(self, message: str, *, code: str, request_id: str | None) -> None:
        super().__init__(message, code=code)
        self.request_id = request_id


def parse_request(frames: list[bytes], max_bytes: int) -> Request:
    if len(frames) != 1:
        raise BadRequest(f"expected one frame per message, got {len(frames)}", code="extra_frames", request_id=None)
    raw = frames[0]
    if len(raw) > max_bytes:
        head = HEAD_ID.match(raw, 0, 512)
        raise BadRequest(
            f"message of {len(raw)} bytes is over the daemon's limit of {max_bytes} (daemon.max_message_bytes)",
            code="too_large",
            request_id=head.group(1).decode() if head else None,
        )
    try:
        msg = read_json(raw)
    except (ValueError, RecursionError) as exc:  # ValueError: also an integer of over 4,300 digits
        raise BadRequest(f"message is not valid JSON: {exc}", code="invalid_json", request_id=None) from None
    where = lone_surrogate_at(raw, msg)
    if where is not None:  # the id echoed only when it is text: a strict JSON decoder refuses "\ud800"
        rid = msg.get("id") if isinstance(msg, dict) else None
        text_id = rid if isinstance(rid, str) and not SURROGATE.search(rid) else None
        raise BadRequest(not_text(where), code="bad_request", request_id=text_id)
    if not isinstance(msg, dict):
        raise BadRequest(
            f"message must be a JSON object, got {json_type(type(msg))}", code="not_object", request_id=None
        )
    rid = msg.get("id")
    if not isinstance(rid, str) or not rid or len(rid) > 200:
        raise BadRequest(
            "field 'id' must be a non-empty string of at most 200 characters", code="bad_field", request_id=None
        )
    reader = _Fields(msg, rid)
    version = msg.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:  # not true, not 1.0
        raise BadRequest(
            f"unsupported protocol version {as_json(version)}; this daemon (locod {__version__}) speaks "
            f"v{PROTOCOL_VERSION}: use a client of its version, or run a daemon of the client's",
            code="unsupported_version",
            request_id=rid,
        )
    op = msg.get("op")
    if op not in OPS:
        raise BadRequest(f"unknown op {as_json(op)}; known: {', '.join(OPS)}", code="unknown_op", request_id=rid)
    _refuse_unknown_fields(reader, op)
    secret = reader.optional("secret", str)
    if op == "chat":
        return _parse_chat(reader, secret)
    if op == "feedback":
        decision = reader.required("decision", int)
        satisfied = reader.required("satisfied", bool)
        return FeedbackRequest(rid, decision, satisfied, secret)
    return SimpleRequest(rid, op, secret, _record_query(reader))


def _refuse_unknown_fields(reader: _Fields, op: str) -> None:
    """A field ``op`` does not take is refused by name (``OP_FIELDS``); a chat option sent beside ``options``
    is told where it goes."""
    taken = ("v", "id", "op", "secret", *OP_FIELDS.get(op, ()))
    unknown = sorted(name for name in reader.msg if name not in taken)
    if not unknown:
        return
    where = " (a chat option: send it in 'options')" if op == "chat" and unknown[0] in OPTIONS else ""
    raise reader.bad(
        unknown[0],
        f"is not one op {op!r} takes{where}; it takes {', '.join(taken)} (this daemon: locod {__version__})",
    )


def _record_query(reader: _Fields) -> RecordQuery:
    """The ``decisions`` op's fields (no other op takes them: ``_refuse_unknown_fields``)."""
    limit = reader.optional("limit", int)
    limit = 20 if limit is None else limit  # a 0 is refused below, not taken for the default
    if not 1 <= limit <= 1000:
        raise reader.bad("limit", "must be between 1 and 1000")
    texts = {name: reader.optional(name, str) for name in ("of", "session", "location", "outcome")}
    for name in ("of", "session"):
        if texts[name] is not None and not 0 < len(texts[name]) <= MAX_ID_CHARS:
            raise reader.bad(name, f"must be a string of 1 to {MAX_ID_CHARS} characters")
    for name, known in (("location", LOCATIONS), ("outcome", OUTCOMES)):
        if texts[name] is not None and texts[name] not in known:
            raise reader.bad(name, f"must be one of {', '.join(known)}")
    since = reader.optional("since", float)
    if since is not None and not math.isfinite(since):
        raise reader.bad("since", "must be a finite Unix time")
    before = reader.optional("before", int)
    if before is not None and before < 1:
        raise reader.bad("before", "must be a decision id, 1 or more")
    return RecordQuery(limit, since=since, before=before, **texts)


_OPENING = re.compile(r"\s*\{")
_LEADING_KEY = re.compile(r'\s*"(secret|id)"\s*:\s*(?=")')
_COMMA = re.compile(r"\s*,")


def leading_fields(raw: bytes, within: int = 4096) -> dict[str, str]:
    """``secret`` and ``id`` when a message begins with them (as ``encode_request`` writes it), read from
    its first ``within`` bytes alone: a tcp endpoint checks the secret before it parses the rest, so a
    client without it cannot make the daemon decode megabytes of JSON and base64 (docs/protocol.md)."""
    text = raw[:within].decode("utf-8", "replace")
    opening = _OPENING.match(text)
    if opening is None:
        return {}
    out: dict[str, str] = {}
    pos, decoder = opening.end(), json.JSONDecoder()
    while (key := _LEADING_KEY.match(text, pos)) is not None and key.group(1) not in out:
        try:
            out[key.group(1)], pos = decoder.raw_decode(text, key.end())
        except ValueError:  # cut off by `within`: not a leading field this check can read
            break
        comma = _COMMA.match(text, pos)
        if comma is None:
            break
        pos = comma.end()
    return out


def zmq_address(endpoint: str) -> bytes:
    """``endpoint`` as ZeroMQ takes it: an ipc path in the file system's encoding, the bytes its directory was
    made with. Given a str, pyzmq encodes it as UTF-8, which a non-ASCII path that Python read in an ASCII
    locale (``LC_ALL=C`` without UTF-8 mode) is not: binding it ended the daemon's start in a traceback."""
    if endpoint.startswith("ipc://"):
        return b"ipc://" + os.fsencode(endpoint[6:])
    return endpoint.encode()


ENDPOINT_SHAPE = "ipc://PATH or tcp://HOST:PORT (such as tcp://127.0.0.1:5557; IPv6: tcp://[::1]:5557)"


def tcp_host_port(endpoint: str) -> tuple[str, int] | None:
    """The host (IPv6 without its brackets) and port of a ``tcp://HOST:PORT`` endpoint; None for anything else,
    a port out of 1-65535 or not in ASCII digits included (ZeroMQ's ``*`` for any port too), and an IPv6 host
    not in brackets: ZeroMQ's socket is told IPv6 only for ``tcp://[`` (``ipv6``), so ``tcp://::1:5557`` failed
    its bind after the model was loaded and waited forever at a connect; it is ambiguous too (``::1:5557`` is
    itself an IPv6 address)."""
    if not endpoint.startswith("tcp://"):
        return None
    written, _, port = endpoint[6:].rpartition(":")
    host, number = unbracketed(written), port_number(port)
    bare_ipv6 = ":" in host and host == written
    return (host, number) if host and number is not None and not bare_ipv6 else None


def endpoint_problem(endpoint: str) -> str | None:
    """What keeps ``endpoint`` from being one a client connects to, in words; None when it is one. ZeroMQ's
    own refusal said "Invalid argument (addr=b'x')", and ``tcp://host`` without a port was a traceback."""
    if (endpoint.startswith("ipc://") and len(endpoint) > 6) or tcp_host_port(endpoint) is not None:
        return None
    return f"endpoint {quoted(endpoint)} must look like {ENDPOINT_SHAPE}"


def port_number(text: str) -> int | None:
    """The port ``text`` names, 1 to 65535 in ASCII digits, else None: ``str.isdigit`` takes "²", which int()
    refused in a traceback; ZeroMQ took tcp://127.0.0.1:99999, the daemon saying it served there, and refused
    :abc only at the bind, after the model was loaded, as a port another program might hold."""
    return int(text) if text.isascii() and text.isdigit() and 0 < int(text) < 65536 else None


def unbracketed(host: str) -> str:
    """An address's host as the loopback check compares it: IPv6's [::1] written ::1."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def ipv6(endpoint: str) -> bool:
    """Whether ``endpoint`` is a tcp address written in IPv6 (``tcp://[::1]:5557``): ZeroMQ binds and connects
    to one only on a socket told so, which would then take an IPv4 client's address for ``::ffff:127.0.0.1``."""
    return endpoint.startswith("tcp://[")


NOT_TEXT = "holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), which is not text"


def read_json(raw: bytes | bytearray) -> Any:
    """JSON as both doors take it: UTF-8 (not UTF-16 or 32, no byte-order mark) and no key twice in an
    object: which of two would win is the parser's choice, and {"op": "ping", "op": "reload"} must not
    reload. Raises ValueError naming the problem."""
    text = bytes(raw).decode("utf-8")  # UnicodeDecodeError is a ValueError
    if text.startswith("\ufeff"):
        raise ValueError("it starts with a byte-order mark")
    return json.loads(text, object_pairs_hook=_unique_keys)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """The object, or ValueError naming its first repeated key in sort order: counted in one pass, as each
    key counted anew over the whole object held the daemon's loop for minutes on one message of a few
    hundred KiB, for every door's clients (docs/reliability.md)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        repeated = min(k for k, times in Counter(k for k, _ in pairs).items() if times > 1)
        raise ValueError(f"key {repeated!r} appears twice in one object")
    return out


_Trail = tuple[Any, str | int] | None  # (the parent's trail, a key or an index); None: the message itself


def lone_surrogate_at(raw: bytes | bytearray, value: Any) -> str | None:
    """Where the first string (key or value) in a parsed message holds a surrogate that no pair completed,
    as a field's path (``options.stop[0]``; "" the message itself), or None when none does: such a string
    cannot be encoded, so it would fail later, in a backend, as an internal error. Walks the value only when
    the raw text has a surrogate escape at all."""
    if not LONE_SURROGATE_ESCAPE.search(raw):
        return None
    # Each item keeps the way to it as a link to its parent's (a key or an index), spelt out only for the
    # one found: a path string for every item grew with its depth, gigabytes for a wide list deep inside.
    stack: list[tuple[_Trail, Any]] = [(None, value)]
    while stack:
        trail, item = stack.pop()
        if isinstance(item, str):
            if SURROGATE.search(item):
                return _spelt(trail)
        elif isinstance(item, dict):
            for key, nested in reversed(item.items()):  # popped in the message's order
                at = (trail, key)
                stack.extend(((at, nested), (at, key)))  # the key first: a field named so holds it
        elif isinstance(item, list):
            stack.extend(((trail, i), nested) for i, nested in reversed(list(enumerate(item))))
    return None


def _spelt(trail: _Trail) -> str:
    """A trail as a field's path, ``options.stop[0]``; a key's lone surrogate shown as U+FFFD, since the
    path is said in a reply, which must be text, and a long key by its first ``KEY_SHOWN`` characters: a
    300 kB key holding one came back whole, at both doors."""
    steps: list[str] = []
    while trail is not None:
        trail, step = trail
        steps.append(f"[{step}]" if isinstance(step, int) else "." + _key_shown(SURROGATE.sub("\ufffd", step)))
    return "".join(reversed(steps)).removeprefix(".")


KEY_SHOWN = 80  # characters of a key that a path shows


def _key_shown(key: str) -> str:
    return key if len(key) <= KEY_SHOWN else f"{key[:KEY_SHOWN]}...({len(key):,} characters)"


# A refusal names a value's type as JSON does: its reader may write a client in any language, to whom
# "got NoneType" or "must be str" (Python's names) says little.
JSON_TYPE_NAMES: dict[type, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    list: "an array",
    dict: "an object",
    type(None): "null",
}


def json_type(kind: type) -> str:
    """``kind`` by its JSON name (``an integer``, ``null``)."""
    return JSON_TYPE_NAMES.get(kind, kind.__name__)


def as_json(value: Any, most: int = 40) -> str:
    """A value of a request as its JSON text (``true``, ``null``, ``"x"``), its first ``most`` characters; an
    array or object by its type alone (one nested as deep as the decoder allows would not be written back)."""
    if isinstance(value, list | dict):
        return json_type(type(value))
    return json.dumps(value, ensure_ascii=False)[:most]


def not_text(where: str) -> str:
    """A lone surrogate's refusal, naming where it is (``lone_surrogate_at``)."""
    return f"field {where!r} {NOT_TEXT}" if where else f"message {NOT_TEXT}"


class _Fields:
    """Typed field access that turns every mismatch into a BadRequest naming the field, by its whole path
    (``options.stream``, ``attachments[1].kind``) when it is read from a nested object (``within``)."""

    def __init__(self, msg: dict[str, Any], rid: str, path: str = "") -> None:
        self.msg, self.rid, self.path = msg, rid, path

    def within(self, nested: dict[str, Any], path: str) -> _Fields:
        """A reader of ``nested``, the object at ``path``: a bare 'kind' did not say which attachment's."""
        return _Fields(nested, self.rid, f"{self.path}{path}.")

    def bad(self, name: str, why: str) -> BadRequest:
        return BadRequest(f"field {quoted(self.path + name)} {why}", code="bad_field", request_id=self.rid)

    def required(self, name: str, kind: type) -> Any:
        if name not in self.msg:
            raise self.bad(name, "is required")
        return self._check(name, self.msg[name], kind)

    def optional(self, name: str, kind: type) -> Any:
        value = self.msg.get(name)
        return None if value is None else self._check(name, value, kind)

    def _check(self, name: str, value: Any, kind: type) -> Any:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:  # an integer past a double's range: the loop answered `internal`, with no id
                raise self.bad(name, "is out of range (a double)") from None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.bad(name, f"must be {json_type(kind)}, got {json_type(type(value))}")
        if kind is int and value not in INT64:
            raise self.bad(name, "is out of range (a signed 64-bit integer)")
        return value


def _parse_chat(reader: _Fields, secret: str | None) -> ChatRequest:
    msg = reader.msg
    if ("prompt" in msg) == ("messages" in msg):
        raise reader.bad("prompt", "or 'messages' is required (exactly one of them)")
    if "prompt" in msg:
        messages = [{"role": "user", "content": reader.required("prompt", str)}]
    else:
        raw = reader.required("messages", list)
        messages = []
        for i, item in enumerate(raw):
            if not isinstance(item, dict) or set(item) - {"role", "content"}:
                raise reader.bad(f"messages[{i}]", "must be an object with 'role' and 'content'")
            role, content = item.get("role"), item.get("content")
            if role not in ROLES or not isinstance(content, str):
                raise reader.bad(f"messages[{i}]", f"needs role in {ROLES} and string content")
            messages.append({"role": role, "content": content})
    if not messages or messages[-1]["role"] != "user":
        raise reader.bad("messages", "must end with a user message")
    if not messages[-1]["content"].strip():
        raise BadRequest("the prompt is empty", code="empty_prompt", request_id=reader.rid)
    session = reader.optional("session", str)
    if session is not None and not 0 < len(session) <= MAX_ID_CHARS:
        raise reader.bad("session", f"must be 1 to {MAX_ID_CHARS} characters")
    attachments = [_parse_attachment(reader, i, a) for i, a in enumerate(reader.optional("attachments", list) or [])]
    options = _parse_options(reader, reader.optional("options", dict) or {})
    return ChatRequest(reader.rid, messages, session, reader.optional("model", str), attachments, options, secret)


def _parse_attachment(reader: _Fields, index: int, raw: Any) -> Attachment:
    where = f"attachments[{index}]"
    if not isinstance(raw, dict):
        raise reader.bad(where, "must be an object")
    unknown = set(raw) - {"kind", "name", "data", "path", "private"}
    if unknown:
        raise reader.bad(where, f"has unknown keys {listed(unknown)}")
    item = reader.within(raw, where)
    kind = item.required("kind", str)
    if kind not in ATTACHMENT_KINDS:
        raise item.bad("kind", f"must be one of {ATTACHMENT_KINDS}")
    name = item.optional("name", str) or f"attachment-{index}"
    data_b64, path = item.optional("data", str), item.optional("path", str)
    if (data_b64 is None) == (path is None):
        raise reader.bad(where, "needs exactly one of 'data' (base64) or 'path'")
    data = None
    if data_b64 is not None:
        try:
            data = base64.b64decode(data_b64, validate=True)
        except (binascii.Error, ValueError):
            raise item.bad("data", "is not valid base64") from None
    private = item.optional("private", bool) or False
    return Attachment(kind, name[:200], data, path, private)


def option_problem(name: str, value: Any) -> str | None:
    """Why a chat option's value is refused (None: it is fine), by the one rule both doors apply: numbers
    that are not booleans, integers where an integer is meant, within range (NaN is in no range)."""
    kind, lo, hi, what = OPTION_RULES[name]
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or (kind is int and not isinstance(value, int)) or not lo <= value <= hi:
        return f"must be {what}, got {as_json(value)}"
    return None


def stop_problem(value: Any) -> str | None:
    """Why stop sequences are refused (None: they are fine): a list of non-empty strings, both doors' rule."""
    if not isinstance(value, list):
        return f"must be an array of non-empty strings, got {as_json(value)}"
    wrong = next((i for i, s in enumerate(value) if not (isinstance(s, str) and s)), None)
    if wrong is not None:
        return f"must be an array of non-empty strings; its item {wrong} is {as_json(value[wrong])}"
    if len(value) > MAX_STOP_SEQUENCES or any(len(s) > MAX_STOP_CHARS for s in value):
        return f"takes at most {MAX_STOP_SEQUENCES} sequences of at most {MAX_STOP_CHARS} characters each"
    return None


def response_format_problem(value: Any) -> str | None:
    """Why a response format is refused (None: it is fine), both doors' rule: one of OpenAI's shapes, with
    nothing in it that would be left unread (a schema given beside ``json_object``, as some servers take it,
    would be ignored: it goes in ``json_schema``)."""
    shapes = '{"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}'
    if not isinstance(value, dict) or value.get("type") not in RESPONSE_FORMATS:
        return f'must be {shapes} or {{"type": "text"}}, got {_format_shown(value)}'
    expected = {"type", "json_schema"} if value["type"] == "json_schema" else {"type"}
    unread = sorted(set(value) - expected)
    if unread:
        return f"of type {as_json(value['type'])} has keys locod would leave unread, {unread}: send {shapes}"
    spec = value.get("json_schema")
    if value["type"] == "json_schema" and not (isinstance(spec, dict) and isinstance(spec.get("schema"), dict)):
        return f'of type json_schema needs "json_schema": {{"name": ..., "schema": {{...}}}}, got {as_json(spec)}'
    unread = sorted(set(spec) - set(JSON_SCHEMA_KEYS)) if isinstance(spec, dict) else []
    if unread:
        return f"has json_schema keys locod would leave unread, {unread}: it takes {', '.join(JSON_SCHEMA_KEYS)}"
    mistyped = [key for key, kind in JSON_SCHEMA_TYPES.items() if isinstance(spec, dict) and _mistyped(spec, key, kind)]
    if mistyped:  # "strict": "false" went to a cloud model as given (OpenAI refuses it), unread by a local one
        return f"has json_schema.{mistyped[0]} of the wrong type: name and description are strings, strict a boolean"
    if isinstance(spec, dict) and not JSON_SCHEMA_NAME.fullmatch(spec.get("name") or ""):
        # OpenAI's API refuses it (a cloud turn then fell back to local), and a local one was answered: one rule
        name = spec.get("name")
        return f"needs json_schema.name, 1 to 64 letters, digits, _ or - (as OpenAI's API does), got {as_json(name)}"
    return None


def _format_shown(value: Any) -> str:
    """A refused response format as a refusal shows it: an object by its ``type``, the one key read first."""
    return f'an object with "type": {as_json(value.get("type"))}' if isinstance(value, dict) else as_json(value)


def _mistyped(spec: dict[str, Any], key: str, kind: type) -> bool:
    return spec.get(key) is not None and not isinstance(spec[key], kind)


def response_format(value: Any) -> dict[str, Any] | None:
    """A response format as a request holds it, once ``response_format_problem`` passed it: plain text, the
    default, is None."""
    return None if value is None or value["type"] == "text" else value


def optional_float(value: int | float | None) -> float | None:
    """A number option as a request holds it (an integer sent for it is that number); None: not sent."""
    return None if value is None else float(value)


def _parse_options(reader: _Fields, raw: dict[str, Any]) -> ChatOptions:
    unknown = set(raw) - set(OPTIONS)
    if unknown:  # a newer client's, perhaps (the client's retry without ``queued`` reads its name here)
        raise reader.bad(
            "options",
            f"has unknown keys {listed(unknown)}; this daemon (locod {__version__}) knows {', '.join(OPTIONS)} "
            "(a client newer than the daemon: restart the daemon, which keeps its code until then)",
        )
    options = reader.within(raw, "options")
    for name in OPTION_RULES:
        problem = None if raw.get(name) is None else option_problem(name, raw[name])
        if problem:
            raise options.bad(name, problem)
    max_tokens = raw.get("max_tokens")
    force = options.optional("force", str)
    if force is not None and force not in FORCE:
        raise options.bad("force", f"must be one of {FORCE}")
    stream = options.optional("stream", bool)
    queued = options.optional("queued", bool)
    stop = [] if raw.get("stop") is None else raw["stop"]  # null, as for every option: the default
    problem = stop_problem(stop)
    if problem:
        raise options.bad("stop", problem)
    problem = None if raw.get("response_format") is None else response_format_problem(raw["response_format"])
    if problem:
        raise options.bad("response_format", problem)
    return ChatOptions(
        max_tokens=max_tokens,
        temperature=optional_float(raw.get("temperature")),
        seed=raw.get("seed"),
        force=force,
        stream=True if stream is None else stream,
        queued=bool(queued),
        stop=tuple(stop),
        top_p=optional_float(raw.get("top_p")),
        frequency_penalty=optional_float(raw.get("frequency_penalty")),
        presence_penalty=optional_float(raw.get("presence_penalty")),
        response_format=response_format(raw.get("response_format")),
    )


# -- the client's side of requests -------------------------------------------------------------------


def encode_request(request: Request) -> bytes:
    """One request frame: the inverse of ``parse_request``."""
    # The secret and the id first: a tcp endpoint reads them before it parses the rest (leading_fields).
    msg: dict[str, Any] = {} if request.secret is None else {"secret": request.secret}
    msg.update(id=request.id, v=PROTOCOL_VERSION)
    if isinstance(request, ChatRequest):
        msg.update(op=request.op, messages=request.messages)
        if request.session is not None:
            msg["session"] = request.session
        if request.model is not None:
            msg["model"] = request.model
        if request.attachments:
            msg["attachments"] = [_attachment_wire(a) for a in request.attachments]
        options = {k: v for k, v in vars(request.options).items() if v != getattr(DEFAULT_OPTIONS, k)}
        if "stop" in options:
            options["stop"] = list(options["stop"])
        if options:
            msg["options"] = options
    elif isinstance(request, FeedbackRequest):
        msg.update(op=request.op, decision=request.decision, satisfied=request.satisfied)
    else:
        msg["op"] = request.op
        if request.op == "decisions":
            msg.update((name, value) for name, value in asdict(request.query).items() if value is not None)
    return json.dumps(msg, separators=(",", ":"), default=_not_json).encode()


def _not_json(value: object) -> NoReturn:
    """Refuse a value JSON cannot hold (a datetime, a numpy integer) as a request error with a code: it was
    json's TypeError, the one error of a request that was no LocodError."""
    raise ProtocolError(
        f"a {type(value).__name__} cannot be sent: a request holds JSON values alone (text, numbers, booleans, "
        "lists, objects)",
        code="bad_field",
    )


DEFAULT_OPTIONS = ChatOptions()


def _attachment_wire(a: Attachment) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": a.kind, "name": a.name, "private": a.private}
    if a.data is not None:
        out["data"] = base64.b64encode(a.data).decode()
    else:
        out["path"] = a.path
    return out


# -- reply frames ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecisionFrame:
    """Where the turn runs and why; sent once its record is committed (the turn is then accepted)."""

    type: ClassVar[str] = "decision"
    decision: int
    location: str
    model: str
    reason: str
    attachments_sent: list[str]
    explored: bool
    notice: str | None = field(default=None, metadata={"omit_if_none": True})  # said to the user, always


@dataclass(frozen=True)
class DeltaFrame:
    """A chunk of the answer."""

    type: ClassVar[str] = "delta"
    text: str


@dataclass(frozen=True)
class FallbackFrame:
    """The cloud failed and the local model answers instead, from the start: a client discards the text
    of any delta it received before this frame."""

    type: ClassVar[str] = "fallback"
    decision: int
    model: str
    cause: str
    message: str


@dataclass(frozen=True)
class EscalatedFrame:
    """The local model answered, was not sure enough of its answer, and the cloud answers instead, from the
    start. No text of the local answer was sent: a turn that may escalate holds its answer back until it is
    judged. ``confidence``: the local answer's predicted satisfaction, after its confidence was read."""

    type: ClassVar[str] = "escalated"
    decision: int
    model: str
    confidence: float
    message: str
    notice: str | None = field(default=None, metadata={"omit_if_none": True})  # as the decision frame's


@dataclass(frozen=True)
class QueuedFrame:
    """The turn waits for the local model (another turn has it), or, before that, for its session's earlier
    turns: ``ahead`` turns go first. Sent, to a request that asked (``options.queued``), when it starts
    waiting, each time the queue moves, and every ``QUEUED_EVERY_S`` seconds while it waits; never after the
    ``decision`` frame."""

    type: ClassVar[str] = "queued"
    ahead: int


# A turn's outcomes (a done frame's, a decision record's) when it was answered whole: those a label grades.
ANSWERED = ("ok", "fallback", "escalated")  # escalated: by the cloud, after the local answer was judged


@dataclass(frozen=True)
class DoneFrame:
    """The turn's end, sent after its record is completed; ``text`` only when not streamed."""

    type: ClassVar[str] = "done"
    decision: int
    session: str
    outcome: str
    location: str
    model: str
    tokens_in: int
    tokens_out: int
    cost_usd: float
    latency_ms: float
    first_token_ms: float | None
    text: str | None = field(default=None, metadata={"omit_if_none": True})
    cost_estimated: bool | None = field(default=None, metadata={"omit_if_none": True})  # true: priced from text
    finish_reason: str | None = field(default=None, metadata={"omit_if_none": True})  # the backend's own


@dataclass(frozen=True)
class ErrorFrame:
    """Any request's failure; ``decision`` when an accepted turn ended so."""

    type: ClassVar[str] = "error"
    kind: str
    code: str
    message: str
    decision: int | None = field(default=None, metadata={"omit_if_none": True})

    @classmethod
    def of(cls, error: LocodError, decision: int | None = None) -> ErrorFrame:
        """``kind`` names the class in locod.errors, ``code`` the specific problem; ``decision`` the turn it
        ended, else the one the error was reported with (a client passing a daemon's error on)."""
        return cls(type(error).code, error.code, error.message, error.decision if decision is None else decision)

    def error(self) -> LocodError:
        """The matching ``locod.errors`` instance, as the client raises it, with the turn it ended."""
        return from_frame(self.kind, self.code, self.message, self.decision)


@dataclass(frozen=True)
class ResultFrame:
    """The answer to any op but ``chat``."""

    type: ClassVar[str] = "result"
    op: str
    data: Any


Frame = QueuedFrame | DecisionFrame | DeltaFrame | FallbackFrame | EscalatedFrame | DoneFrame | ErrorFrame | ResultFrame
FRAME_TYPES: dict[str, type[Frame]] = {
    cls.type: cls
    for cls in (
        QueuedFrame,
        DecisionFrame,
        DeltaFrame,
        FallbackFrame,
        EscalatedFrame,
        DoneFrame,
        ErrorFrame,
        ResultFrame,
    )
}
LAST_FRAMES = ("done", "error", "result")  # a request's reply ends with one of these


def encode_frame(request_id: str | None, frame: Frame) -> bytes:
    """One reply frame on the wire."""
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": request_id, "type": frame.type}
    for f in fields(frame):
        value = getattr(frame, f.name)
        if value is not None or not f.metadata.get("omit_if_none"):
            body[f.name] = value
    return json.dumps(body, separators=(",", ":")).encode()


def decode_frame(raw: bytes) -> tuple[str | None, Frame]:
    """(request id, frame) from a reply frame; a ProtocolError for anything the daemon would not send."""
    try:
        body = json.loads(raw)
        cls = FRAME_TYPES[body["type"]]
        names = {f.name for f in fields(cls)}
        frame = cls(**{k: v for k, v in body.items() if k in names})
    except (ValueError, KeyError, TypeError) as exc:
        raise ProtocolError(f"unreadable reply frame from the daemon: {exc!r}", code="bad_reply") from None
    if isinstance(frame, ErrorFrame):
        _check_error_frame(frame)
    return body.get("id"), frame


def _check_error_frame(frame: ErrorFrame) -> None:
    """Refuse an error frame whose fields are not the daemon's types: a broken or hostile end's ``decision``
    of text reached `locod ask`'s stderr as a command to run (`locod decisions 1; rm -rf ~`), and a ``kind``
    of a list ended the client in a TypeError's traceback."""
    odd = [name for name in ("kind", "code", "message") if not isinstance(getattr(frame, name), str)]
    if frame.decision is not None and type(frame.decision) is not int:  # bool is not
        odd.append("decision")
    if odd:
        raise ProtocolError(f"unreadable error frame from the daemon: {listed(odd)} of a wrong type", code="bad_reply")
