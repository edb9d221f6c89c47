"""OpenAI's chat-completions shapes, translated to and from locod's own: a request body becomes the parts of
a ``ChatRequest``, frames become a completion, stream chunks and error bodies (docs/http.md).

Pure data in, data out: the HTTP server (``httpapi.py``) does the I/O, this module the mapping, so every
rule about what the OpenAI API means in locod's terms is in one place.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from locod.daemon.config import ROUTED_MODEL, gguf_path_hint
from locod.daemon.decision import Offered, left_out_note, meant_instead
from locod.errors import (
    MODEL_RELOADED,
    AttachmentError,
    Busy,
    CloudError,
    ModelError,
    PromptTooLong,
    ProtocolError,
    RequestError,
    UnknownDecision,
    UnknownModel,
)
from locod.protocol import (
    OPTION_RULES,
    Attachment,
    ChatOptions,
    DecisionFrame,
    DoneFrame,
    ErrorFrame,
    as_json,
    option_problem,
    optional_float,
    response_format,
    response_format_problem,
    stop_problem,
)
from locod.words import quoted

# Keys that change what an answer is and that locod cannot honour: refused rather than silently ignored.
UNSUPPORTED = (
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "audio",  # a spoken answer (with ``modalities``): the SDK would find ``message.audio`` empty
    "modalities",
    "web_search_options",  # an answer from a web search, with its citations: locod searches nothing
    "moderation",  # a request or answer blocked (or scored) by a moderation model: locod runs none
)
# Those that ask for tool calls: an agent that wants a structured answer can ask for it as JSON instead.
TOOL_FIELDS = ("tools", "tool_choice", "functions", "function_call")
# Values of those that ask for what every answer is anyway (clients and plugins send them spelled out).
AS_DEFAULT: dict[str, tuple[Any, ...]] = {
    "modalities": (["text"],),
    "tool_choice": ("none",),
    "function_call": ("none",),
    "logit_bias": ({},),
    "top_logprobs": (0,),
}
# stream_options' keys, both booleans: obfuscation pads OpenAI's chunks against a side channel; locod sends none.
STREAM_OPTIONS = ("include_usage", "include_obfuscation")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class HttpError(Exception):
    """A request refused before it reaches the daemon, with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.turn_headers: dict[str, str] = {}  # a turn's x-request-id, and its x-locod-* once it was decided

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}
        default = "invalid_request_error" if self.status < 500 else "server_error"
        error = {"message": self.message, "type": kind.get(self.status, default), "param": self.param}
        return {"error": {**error, "code": self.code}}

    def headers(self) -> dict[str, str]:
        """``Retry-After`` on a 429 (a limit of turns in flight, freed as turns end) and on a turn whose model a
        reload removed (sent again, it is decided anew): the SDKs wait that long before their own retry, as
        they do for the connection limit's 503 (httpconn.py); and the headers of a turn that failed once
        handed in (its ``x-request-id``; after its decision, the ``x-locod-*`` by which its record is found).
        A turn that was decided and then failed (500, 502: after the daemon's own cloud retries and fallback)
        says ``x-should-retry: false``: the SDKs retry any 5xx, which ran and recorded the whole turn again."""
        retry = self.status == 429 or self.code == MODEL_RELOADED
        ran = self.status in (500, 502) and "x-locod-decision" in self.turn_headers
        return {
            **self.turn_headers,
            **({"retry-after": "1"} if retry else {}),
            **({"x-should-retry": "false"} if ran else {}),
        }


def request_id() -> str:
    """The ``x-request-id`` of a reply that is no turn's (a refusal before one, ``GET /v1/models``): every
    reply carries one, which the SDKs keep as an error's ``request_id``, as a turn's is its completion's id."""
    return "req-" + uuid.uuid4().hex[:24]


@dataclass(frozen=True)
class Completion:
    """What a chat-completions body asks, in locod's terms."""

    messages: list[dict[str, str]]
    attachments: list[Attachment]
    model: str | None  # None: "auto", the router decides
    options: ChatOptions
    include_usage: bool = False


def bad(message: str, param: str | None = None, code: str = "bad_field") -> HttpError:
    return HttpError(400, message, code, param)


def unknown_model(
    model: str, models: list[str], offered: Offered | None, left_out: Mapping[str, ModelError] | None = None
) -> HttpError:
    """A model name nothing here serves, in a chat or ``GET /v1/models/{id}``, told what to send instead: the
    names ``GET /v1/models`` lists, apart from them the local models ``left_out`` for their file, with why,
    and what the name was meant as, in the socket's words (``meant_instead``: a cloud model's endpoint id,
    which code written for the provider sends, a local model's GGUF file); ``offered`` None: names alone."""
    left_out = left_out or {}
    names = [name for name in models if name not in left_out]
    meant = meant_instead(offered, model, left_out) if offered else gguf_path_hint(model)
    hint = f"send 'auto' or {_one_of(names)}{left_out_note(left_out, offered)}{meant}"
    message = f"the model {quoted(model)} does not exist; {hint}; see GET /v1/models"
    return HttpError(404, message, "model_not_found", "model")


def _one_of(models: list[str], shown: int = 8) -> str:
    """The configured model names a client may send instead of an unknown one (the first few, when many)."""
    names = ", ".join(repr(name) for name in models[:shown])
    return f"one of {names}" + (f" and {len(models) - shown} more" if len(models) > shown else "")


def parse_completion(
    body: Any,
    models: list[str],
    offered: Offered | None = None,
    left_out: Callable[[], Mapping[str, ModelError]] = dict,
) -> Completion:
    """A chat-completions body, checked; ``models`` are the configured model names (``auto`` aside),
    ``offered`` what an unknown name may have been meant as (``unknown_model``), ``left_out`` asked for the
    local models routing leaves out for their file when an unknown name's refusal lists them apart (named,
    they are refused by the daemon with their file's story)."""
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    for key in UNSUPPORTED:
        if not _asks_default(key, body.get(key)):
            instead = (
                ", which calls no tools; send the request without it (a structured answer can be asked for with "
                "response_format and a json_schema, which locod honours)"
                if key in TOOL_FIELDS
                else "; send the request without it"
            )
            raise bad(f"{key!r} is not supported by locod{instead}", key, "unsupported_parameter")
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):  # not true, not 1.0: what the socket would refuse
        raise bad(
            f"'n' must be 1, got {as_json(n)}: locod writes one choice per request; send n=1 (or none), and ask again "
            "for another answer",
            "n",
            "unsupported_parameter",
        )
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required: 'auto' or a configured model name", "model")
    if model != ROUTED_MODEL and model not in models:
        raise unknown_model(model, models, offered, left_out())
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad("'messages' must be a non-empty list", "messages")
    messages, attachments = _messages(raw)
    options = _options(body)
    return Completion(
        messages,
        attachments,
        None if model == ROUTED_MODEL else model,
        options,
        _include_usage(body.get("stream_options"), options.stream),
    )


def _include_usage(stream_options: Any, stream: bool) -> bool:
    """``stream_options.include_usage``, typed as OpenAI types it: read for truthiness, ``"false"`` turned the
    usage chunk on. Sent without ``stream`` it is checked and then has nothing to apply to (a whole reply
    always holds its usage): OpenAI refuses it there, llama.cpp's server and Ollama ignore it, and a client
    written for them is not refused for a request that means one thing."""
    if stream_options is None:
        return False
    if not isinstance(stream_options, dict):
        raise bad(f"'stream_options' must be an object or null, got {as_json(stream_options)}", "stream_options")
    for key, value in stream_options.items():
        if key not in STREAM_OPTIONS:
            unread = f"'stream_options' has a key locod does not read, {as_json(key)}: it takes {STREAM_OPTIONS}"
            raise bad(unread, "stream_options")
        if value is not None and not isinstance(value, bool):
            raise bad(f"'stream_options.{key}' must be true or false, got {as_json(value)}", f"stream_options.{key}")
    return stream and stream_options.get("include_usage") is True


def _options(body: dict[str, Any]) -> ChatOptions:
    # the field the length limit came in: clients that send every field send the unused one as null
    limit = "max_tokens" if body.get("max_completion_tokens") is None else "max_completion_tokens"
    sent_as = {name: name for name in OPTION_RULES} | {"max_tokens": limit}  # option -> its field
    given = {name: body.get(field) for name, field in sent_as.items()}
    for name in OPTION_RULES:  # the socket's rules (locod.protocol), so both doors take the same values
        problem = None if given[name] is None else option_problem(name, given[name])
        if problem:
            raise bad(f"{sent_as[name]!r} {problem}", sent_as[name])
    max_tokens = given["max_tokens"]
    stream = False if body.get("stream") is None else body["stream"]
    if not isinstance(stream, bool):
        raise bad(f"'stream' must be true or false, got {as_json(stream)}", "stream")
    stop = body.get("stop")
    stop = [] if stop in (None, "") else [stop] if isinstance(stop, str) else stop  # OpenAI takes either
    problem = stop_problem(stop)
    if problem:
        raise bad(f"'stop' {problem}", "stop")
    form = body.get("response_format")
    problem = None if form is None else response_format_problem(form)
    if problem:
        raise bad(f"'response_format' {problem}", "response_format")
    return ChatOptions(
        max_tokens=max_tokens,
        temperature=optional_float(given["temperature"]),  # absent: OpenAI's rule, the answering model's own
        seed=given["seed"],
        stream=stream,
        stop=tuple(stop),
        top_p=optional_float(given["top_p"]),
        frequency_penalty=optional_float(given["frequency_penalty"]),
        presence_penalty=optional_float(given["presence_penalty"]),
        response_format=response_format(form),
    )


def _asks_default(key: str, value: Any) -> bool:
    """Whether an unsupported field's value asks for what every answer is anyway, its type compared too: in
    Python ``0 == False``, so ``logprobs: 0`` (which OpenAI refuses, a boolean expected) passed unread."""
    defaults = (None, [], False, *AS_DEFAULT.get(key, ()))
    return any(type(value) is type(default) and value == default for default in defaults)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _messages(raw: list[Any]) -> tuple[list[dict[str, str]], list[Attachment]]:
    """Text messages, and the images of the last one: an earlier message's images are not sent again (a
    follow-up is answered from the conversation's text; docs/http.md says to attach an image again), so they
    are not decoded either: a chat UI sends every image of the conversation back with each turn."""
    messages: list[dict[str, str]] = []
    images: list[tuple[Any, str]] = []
    for i, item in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("role"), str):
            raise bad(f"{where} must be an object with a role in {sorted(ROLES)}", where)
        if item["role"] not in ROLES:  # a tool's or function's answer: locod calls no tools
            raise bad(
                f"{where}: role {as_json(item['role'])} is not supported by locod, which calls no tools; send roles "
                f"{', '.join(sorted(ROLES))}",
                where,
            )
        content = item.get("content")
        if content is None and item["role"] == "assistant":  # OpenAI's null, as clients send back a turn without text
            content = _refusal(item, where)
        text, found = _content(content, where, item["role"])
        if found and item["role"] != "user":  # as OpenAI: a system or assistant image would be dropped unseen
            raise bad(f"{where}: images are taken in user messages only", where)
        role = ROLES[item["role"]]
        messages.append({"role": role, "content": as_held(text) if role == "assistant" else text})
        images = found
    attachments = [_image(url, at, index) for index, (url, at) in enumerate(images)]  # the last message's
    called = next((i for i, item in enumerate(raw) if item.get("tool_calls") or item.get("function_call")), None)
    if called is not None:  # its calls would be dropped unseen, leaving an empty answer in the model's history
        raise bad(
            f"messages[{called}]: an assistant message's tool calls are not supported by locod, which calls no "
            "tools; send the conversation without them (the message's text as its content)",
            f"messages[{called}]",
        )
    if messages[-1]["role"] != "user":
        raise bad("the last message must be the user's", "messages")
    if not messages[-1]["content"].strip():
        raise bad("the last user message has no text", "messages", "empty_prompt")
    return messages, attachments


def _refusal(message: dict[str, Any], where: str) -> str:
    """The text of an assistant message without content: its ``refusal``, which OpenAI's model writes instead of
    content when it declines (the SDK's ``message.model_dump()`` sends it back so), else none. Dropped, the
    model was shown an empty answer where it had declined, and a follow-up about why read as nonsense."""
    refusal = message.get("refusal")
    if refusal is not None and not isinstance(refusal, str):
        raise bad(f"{where}.refusal must be a string or null", f"{where}.refusal")
    return refusal or ""


def _content(content: Any, where: str, role: str) -> tuple[str, list[tuple[Any, str]]]:
    """A message's text, and its images as they came (each ``image_url``'s url, and where it is), undecoded; an
    assistant's ``refusal`` parts are its text, as OpenAI types them (a history sent back from OpenAI holds them)."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise bad(f"{where}.content must be a string or a list of parts", where)
    texts: list[str] = []
    images: list[tuple[Any, str]] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        at = f"{where}.content[{j}]"
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and role == "assistant" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        elif kind == "image_url" and isinstance(part.get("image_url"), dict):
            images.append((part["image_url"].get("url"), at))
        elif kind == "image_url":
            raise bad(f'{at}.image_url must be an object, {{"url": "data:image/png;base64,..."}}', at)
        elif kind == "text":
            raise bad(f"{at}.text must be a string", at)
        elif not isinstance(kind, str):
            raise bad(f"{at} must be a text or image_url part", at)
        else:  # input_audio, file, the Responses API's input_text: what it holds would go unread
            raise bad(
                f"{at}: a part of type {as_json(kind)} is not supported by locod; send text and image_url parts "
                "(images as data: URLs; documents through the socket API, `locod ask --attach`)",
                at,
            )
    return "\n".join(texts), images


def _image(url: Any, where: str, index: int) -> Attachment:
    """A data URL's bytes as an image attachment; a remote URL is refused (the daemon fetches nothing)."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise bad(f"{where}: only data: URLs are accepted, locod does not fetch remote images", where, "remote_image")
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise bad(f"{where}: the data URL must be base64", where, "bad_image")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"{where}: the data URL is not valid base64", where, "bad_image") from None
    return Attachment("image", f"image-{index}", data)


# -- answers -----------------------------------------------------------------------------------------


# The line streamed after the cloud's partial text when its stream broke and the local model answers
# instead (``broke_off``), as a client sends it back: the answer's two parts are looked up apart. Matched
# only where its opening words are (``broke_off_parts``), never with the line ends before it.
BROKE_OFF_MARK = "[the cloud's answer broke off here"
BROKE_OFF_LINE = re.compile(re.escape(BROKE_OFF_MARK) + r"[^\r\n]*\][ \t]*(?:\r?\n)*")
LINE_END = re.compile(r"[\r\n]")


def broke_off(fallback: str) -> str:
    """Where the cloud's answer broke off, with the fallback's words (why, and an image the local model that
    answers instead cannot see): an OpenAI client cannot discard text it was sent (the socket's clients do,
    on the ``fallback`` frame), and a chat UI shows the text alone."""
    return f"\n\n[the cloud's answer broke off here; {' '.join(fallback.split())}]\n\n"


# What ``notice_line`` writes, as a client sends it back: its line ends maybe CRLF (a browser's text field),
# maybe trimmed to one or none (a private answer sent back is known by its words alone, answer_digests.py:
# the line must come off); the answer's own leading whitespace (an indented code line) is the model's.
NOTICE_LINE = re.compile(r"\[locod: [^\r\n]*\][ \t]*(?:\r?\n){0,2}")


def broke_off_parts(content: str) -> list[str]:
    """A message split at each ``broke_off`` line, the line ends around it dropped, in time linear in its
    length: a regex holding the line ends before the line was tried anew from each of them, and one message
    of blank lines (or of the line's opening words repeated) held the whole daemon, every door, for minutes
    an answer (docs/reliability.md)."""
    parts, part_start, at = [], 0, 0
    while (start := content.find(BROKE_OFF_MARK, at)) != -1:
        line = BROKE_OFF_LINE.match(content, start)
        if line is None:  # no "]" before its line ends, so none after any later opening words on that line
            end = LINE_END.search(content, start)
            at = end.start() if end else len(content)
            continue
        parts.append(content[part_start : _before_line_ends(content, part_start, start)])
        part_start = at = line.end()
    parts.append(content[part_start:])
    return parts


def _before_line_ends(content: str, first: int, end: int) -> int:
    """Where the line ends (LF or CRLF) just before ``end`` begin, back to ``first`` at most."""
    while end > first and content[end - 1] == "\n":
        end -= 2 if end - 2 >= first and content[end - 2] == "\r" else 1
    return end


def notice_line(notice: str) -> str:
    """A turn's notice as the first line of its answer: a chat UI shows the text alone, not ``locod.notice``,
    and its user would otherwise read an answer about an image no model saw as if it had been seen."""
    return f"[locod: {' '.join(notice.split())}]\n\n"  # one line, whatever an error message held


def as_held(answer: str) -> str:
    """An earlier answer as its model wrote it and its session holds it: the notice line the door put first
    is its word to the user, not the model's (a model shown it in its history copies it); of an answer whose
    cloud stream broke off, the local answer that replaced it, as the socket's clients discard the cloud's
    text on the ``fallback`` frame (with both, the history no longer matched and the conversation left its
    session, the break-off line reaching the model)."""
    line = NOTICE_LINE.match(answer)
    return broke_off_parts(answer[line.end() :] if line else answer)[-1]


# A configured local model that cannot run: its file gone or broken, or more than the memory there is.
UNAVAILABLE_MODELS = ("model_missing", "model_corrupt", "model_too_large")
# Busy codes that are no limit of turns (429) but the daemon's state: stopping, or a reload that removed the local
# model the turn was routed to while it waited (ModelZoo.get's: the same request, sent again, is decided anew).
UNAVAILABLE_FOR_NOW = ("shutting_down", "cancelled", MODEL_RELOADED)


def status_of(frame: ErrorFrame) -> int:
    """The HTTP status for a daemon's error frame."""
    if frame.code in ("too_large", "attachment_too_large"):
        return 413
    if frame.kind == Busy.code:  # stopping (or cancelled by the stop before accepted), a reload, or a queue limit
        return 503 if frame.code in UNAVAILABLE_FOR_NOW else 429
    if frame.kind in (UnknownModel.code, UnknownDecision.code) or frame.code in UNAVAILABLE_MODELS:
        return 404  # a model whose file is gone or broken is as unavailable as an unknown one (a 5xx, the SDKs retry)
    if frame.kind in (RequestError.code, ProtocolError.code, AttachmentError.code, PromptTooLong.code):
        return 400
    return 502 if frame.kind == CloudError.code else 500


def error_of(frame: ErrorFrame) -> HttpError:
    param = "messages" if frame.code == PromptTooLong.code else None  # where OpenAI points for a long prompt
    return HttpError(status_of(frame), frame.message, frame.code, param)


def extension(
    decision: DecisionFrame, done: DoneFrame | None, fallback: str | None, escalated: str | None, notice: str | None
) -> dict[str, Any]:
    """The ``locod`` object: where the answer ran and why (the SDKs ignore unknown fields); ``notice`` is the
    answer's, as its first line says it (an escalated answer's is the cloud's, not the decision's)."""
    out: dict[str, Any] = {
        "decision": decision.decision,
        "location": decision.location,
        "model": decision.model,
        "reason": decision.reason,
        "explored": decision.explored,
        "attachments_sent": decision.attachments_sent,
    }
    if notice:  # what the socket's decision (or escalated) frame says too: an image the model could not see, ...
        out["notice"] = notice
    if fallback is not None:
        out["fallback"] = fallback
    if escalated is not None:
        out["escalated"] = escalated
    if done is not None:
        out.update(
            location=done.location,
            model=done.model,
            outcome=done.outcome,
            session=done.session,
            cost_usd=done.cost_usd,
            latency_ms=done.latency_ms,
            first_token_ms=done.first_token_ms,
        )
        if done.cost_estimated:  # as the done frame says it: priced from characters, not from reported usage
            out["cost_estimated"] = True
    return out


def usage(done: DoneFrame) -> dict[str, Any]:
    """OpenAI's ``usage``, and ``estimated: true`` (an extra field, which the SDKs keep in ``model_extra``) when
    its counts are locod's estimate from characters, not the endpoint's: a cloud answer priced so (the done
    frame's ``cost_estimated``). After a fallback the counts are the local model's own, exact, though the
    cost may hold a cut cloud stream's estimated price."""
    counts: dict[str, Any] = {
        "prompt_tokens": done.tokens_in,
        "completion_tokens": done.tokens_out,
        "total_tokens": done.tokens_in + done.tokens_out,
    }
    if done.cost_estimated and done.location == "cloud":
        counts["estimated"] = True
    return counts


def finish_reason(done: DoneFrame, options: ChatOptions, default_max: int, context: int | None) -> str:
    """The backend's own reason (a cloud endpoint's ``content_filter`` passed on as it said it); without one,
    ``length`` when the answer used its whole budget: the ``max_tokens`` asked, or the rest of the
    ``context`` (a local model's window) its prompt left it, where the model was cut short as surely."""
    if done.finish_reason is not None:
        return done.finish_reason
    asked = done.tokens_out >= (options.max_tokens or default_max)
    return "length" if asked or (context is not None and done.tokens_in + done.tokens_out >= context) else "stop"


def completion(
    cid: str, created: int, text: str, done: DoneFrame, reason: str, locod: dict[str, Any]
) -> dict[str, Any]:
    """The whole answer, as ``POST /v1/chat/completions`` without ``stream``."""
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": done.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}],
        "usage": usage(done),
        "locod": locod,
    }


def chunk(
    cid: str, created: int, model: str, delta: dict[str, Any], reason: str | None = None, **extra: Any
) -> dict[str, Any]:
    """One server-sent event of a streamed answer; every chunk of one answer has its ``created`` (OpenAI's
    rule: a client may take the first chunk's as the completion's)."""
    choices = [{"index": 0, "delta": delta, "finish_reason": reason}]
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
    return {**body, "choices": choices, **extra}
