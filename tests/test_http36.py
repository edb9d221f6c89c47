"""The HTTP door field by field against OpenAI's chat-completions API: request fields read loosely (a string
``"false"`` taken as true, ``0`` taken as ``false``) are refused, 400 naming the field, as OpenAI refuses
them; a stream's chunks are OpenAI's, read raw and through the real `openai` SDK against a real daemon."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from locod.daemon.openai_wire import HttpError, parse_completion

from .test_http import LOCAL, http_daemon, sdk

ASK = [{"role": "user", "content": "Count from one to twenty."}]
SCHEMA = {"name": "answer", "schema": {"type": "object"}}


def refusal(**fields: Any) -> HttpError:
    with pytest.raises(HttpError) as refused:
        parse_completion({"model": "auto", "messages": ASK, **fields}, [LOCAL])
    assert refused.value.status == 400
    return refused.value


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"stream": True, "stream_options": {"include_usage": "false"}}, "stream_options.include_usage"),
        ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
        ({"stream": True, "stream_options": {"include_obfuscation": "no"}}, "stream_options.include_obfuscation"),
        ({"stream": True, "stream_options": False}, "stream_options"),
        ({"stream": True, "stream_options": "include_usage"}, "stream_options"),
        ({"stream": True, "stream_options": {"include_usage": True, "chunk_size": 5}}, "stream_options"),
        ({"stream": False, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"response_format": {"type": "json_schema", "json_schema": {**SCHEMA, "strict": "false"}}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {**SCHEMA, "name": 7}}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {**SCHEMA, "description": []}}}, "response_format"),
    ],
)
def test_a_field_of_the_wrong_type_is_refused_by_name(fields: dict[str, Any], param: str) -> None:
    refused = refusal(**fields)
    assert refused.param == param and refused.code == "bad_field", refused.message
    assert refused.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("fields", [{"logprobs": 0}, {"tool_choice": 0}, {"tools": 0.0}, {"logit_bias": 0}])
def test_an_unsupported_field_asks_its_default_in_its_own_type(fields: dict[str, Any]) -> None:
    """``0 == False`` in Python: ``logprobs: 0`` (OpenAI wants a boolean) passed as if it were ``false``."""
    refused = refusal(**fields)
    assert refused.param == next(iter(fields)) and refused.code == "unsupported_parameter"


@pytest.mark.parametrize(
    ("fields", "usage"),
    [
        ({"stream": True, "stream_options": {"include_usage": True}}, True),
        ({"stream": True, "stream_options": {"include_usage": False}}, False),
        ({"stream": True, "stream_options": {"include_usage": None, "include_obfuscation": False}}, False),
        ({"stream": True, "stream_options": {}}, False),
        ({"stream": False, "stream_options": None}, False),
        ({"stream_options": {"include_usage": True}}, False),  # OpenAI refuses it; llama.cpp's server ignores it
        ({"stream": False, "stream_options": {"include_usage": True}}, False),
        ({"logprobs": False, "top_logprobs": 0, "tool_choice": "none", "logit_bias": {}}, False),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {**SCHEMA, "strict": True, "description": None},
                }
            },
            False,
        ),
    ],
)
def test_what_openai_takes_is_taken(fields: dict[str, Any], usage: bool) -> None:
    completion = parse_completion({"model": "auto", "messages": ASK, **fields}, [LOCAL])
    assert completion.include_usage is usage


def sse_events(base: str, body: dict[str, Any]) -> tuple[dict[str, str], list[Any]]:
    """A streamed completion read raw: its headers, and each ``data:`` event (JSON, or ``[DONE]``)."""
    request = urllib.request.Request(
        f"{base}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        headers = {k.lower(): v for k, v in response.headers.items()}
        text = response.read().decode()
    datas = [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]
    return headers, [d if d == "[DONE]" else json.loads(d) for d in datas]


def test_a_stream_and_a_whole_answer_are_openais_field_by_field(daemon_factory: Any) -> None:
    """The SDK refuses nothing a client relies on: with ``include_usage`` every chunk carries ``usage``, null
    but on the last (``choices: []``); one ``id`` and ``created`` throughout, the ``id`` the ``x-request-id``;
    a stop at ``max_tokens`` is ``length``; and ``include_usage: "false"`` is a 400 the SDK raises by name."""
    _, base = http_daemon(daemon_factory)
    ask = {"model": LOCAL, "messages": ASK, "max_tokens": 6, "temperature": 0, "seed": 1, "stream": True}
    headers, events = sse_events(base, {**ask, "stream_options": {"include_usage": True}})
    assert headers["content-type"].startswith("text/event-stream") and events[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(e) for e in events[:-1]]  # as the SDK parses each
    assert {c.id for c in chunks} == {headers["x-request-id"]} and len({c.created for c in chunks}) == 1
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and {c.model for c in chunks} == {LOCAL}
    assert all("usage" in e and e["usage"] is None for e in events[:-2]), events
    *answer, usage = chunks
    assert usage.choices == [] and usage.usage is not None and usage.usage.completion_tokens == 6
    assert usage.usage.total_tokens == usage.usage.prompt_tokens + 6
    assert [c.choices[0].finish_reason for c in answer] == [None] * (len(answer) - 1) + ["length"]
    _, plain = sse_events(base, ask)  # without include_usage: no usage key, no usage chunk
    assert all("usage" not in e for e in plain[:-1]) and all(e["choices"] for e in plain[:-1])

    client = sdk(base)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**ask, stream_options={"include_usage": "false"})  # type: ignore[call-overload, typeddict-item]
    assert refused.value.param == "stream_options.include_usage" and refused.value.code == "bad_field"
    raw = client.chat.completions.with_raw_response.create(
        **{**ask, "stream": False}, stream_options={"include_usage": True}
    )  # ignored, as llama.cpp's server does: a whole reply holds its usage anyway
    whole = raw.parse()
    assert whole.object == "chat.completion" and whole.id == raw.headers["x-request-id"] == raw.request_id
    assert whole.choices[0].finish_reason == "length" and whole.choices[0].message.role == "assistant"
    assert whole.usage is not None and whole.usage.completion_tokens == 6 and isinstance(whole.created, int)
