"""The HTTP door against the installed `openai` SDK, parameter by parameter: every parameter of
`client.chat.completions.create` is honoured, refused by name or named in docs/http.md as ignored, and the
replies, plain and streamed, local and cloud, validate against the SDK's own pydantic models (the SDK itself
builds them without validating, so a wrong shape would pass it unseen)."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.resources.chat.completions import Completions
from openai.types import Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from .conftest import cloud_config
from .faultproxy import FaultProxy
from .test_http import http_daemon, sdk

HTTP_DOC = (Path(__file__).parent.parent / "docs" / "http.md").read_text()
CHAT_TABLE = HTTP_DOC[HTTP_DOC.index("## `POST /v1/chat/completions`") : HTTP_DOC.index("Where the answer ran")]
HI = [{"role": "user", "content": "Hi"}]
# The SDK's hints and bookkeeping that docs/http.md says are accepted and ignored, each with a value it may send.
IGNORED = {
    "reasoning_effort": "high",
    "verbosity": "low",
    "prediction": {"type": "content", "content": "Hello"},
    "user": "u-1",
    "safety_identifier": "u-1",
    "prompt_cache_key": "k-1",
    "prompt_cache_options": {"mode": "implicit"},
    "prompt_cache_retention": "24h",
    "metadata": {"team": "a"},
    "store": True,
    "service_tier": "flex",
    "parallel_tool_calls": False,
}
# Not the request's: the SDK's own transport settings.
SDK_SETTINGS = {"self", "extra_headers", "extra_query", "extra_body", "timeout"}


def sdk_parameters() -> set[str]:
    return set(inspect.signature(Completions.create).parameters) - SDK_SETTINGS


def table_fields() -> set[str]:
    """The fields the chat-completions table's rows name in their first cell (``stream_options.include_usage``
    names ``stream_options``)."""
    rows = re.findall(r"^\| ([^|]+) \|", CHAT_TABLE, re.M)
    return {name for row in rows for name in re.findall(r"`([a-z_]+)", row)}


def test_every_sdk_parameter_is_in_the_chat_completions_table() -> None:
    """A parameter a newer SDK adds (``moderation``, ``verbosity``) was silently ignored with nothing saying so."""
    assert {"messages", "moderation", "verbosity"} <= sdk_parameters()
    assert not sorted(sdk_parameters() - table_fields()), "docs/http.md's table leaves these SDK parameters out"
    ignored_row = next(row for row in CHAT_TABLE.splitlines() if row.startswith("| `reasoning_effort`"))
    assert set(re.findall(r"`([a-z_]+)`", ignored_row.split(" | ")[0])) == set(IGNORED)


def strict_completion(raw: Any) -> ChatCompletion:
    """A whole reply validated by the SDK's model, not built unchecked as ``create`` builds it."""
    return ChatCompletion.model_validate(json.loads(raw.text))


def strict_chunks(raw: Any) -> list[ChatCompletionChunk]:
    body = raw.http_response.read().decode()  # a stream's body is not read for the raw response
    events = [line.removeprefix("data: ") for line in body.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [ChatCompletionChunk.model_validate(json.loads(event)) for event in events[:-1]]


def check_whole_reply(client: openai.OpenAI, model: str, **fields: Any) -> ChatCompletion:
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=HI, max_tokens=6, **fields)
    reply = strict_completion(raw)
    assert reply.object == "chat.completion" and reply.id == raw.headers["x-request-id"] and reply.created > 0
    assert reply.model == model and len(reply.choices) == 1
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content and choice.finish_reason == "length"
    assert reply.usage and reply.usage.completion_tokens == 6
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 6
    return reply


def check_streamed_reply(client: openai.OpenAI, model: str) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=HI, max_tokens=6, stream=True, stream_options={"include_usage": True}
    )
    chunks = strict_chunks(raw)
    assert {(c.id, c.object, c.model, c.created) for c in chunks} == {
        (raw.headers["x-request-id"], "chat.completion.chunk", model, chunks[0].created)
    }
    assert chunks[0].choices[0].delta.role == "assistant"
    *answer, last, usage = chunks
    assert "".join(c.choices[0].delta.content or "" for c in answer) and last.choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in answer) and all(c.usage is None for c in [*answer, last])
    assert usage.choices == [] and usage.usage and usage.usage.completion_tokens == 6


def test_moderation_is_refused_by_name_and_errors_are_the_sdks(daemon_factory: Any) -> None:
    """``moderation`` asks a moderation model to block or score the request and the answer: ignored, a client
    that set it to block got an unchecked answer as if it had passed."""
    handle, base = http_daemon(daemon_factory)
    client = sdk(base)
    moderation: Any = {"model": "omni-moderation-latest", "policy": {"output": {"mode": "block"}}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="auto", messages=HI, moderation=moderation)
    error = refused.value
    assert (error.status_code, error.code, error.param, error.type) == (
        400,
        "unsupported_parameter",
        "moderation",
        "invalid_request_error",
    )
    assert "'moderation' is not supported by locod" in error.message and error.request_id
    assert handle.rows() == []  # refused before a turn: nothing was answered unchecked
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-4o", messages=HI)
    assert (unknown.value.code, unknown.value.param) == ("model_not_found", "model")
    check_whole_reply(client, "smollm2-135m-instruct", moderation=None)


def test_replies_validate_against_the_sdk_models_local(daemon_factory: Any) -> None:
    handle, base = http_daemon(daemon_factory)
    client = sdk(base)
    check_whole_reply(client, "smollm2-135m-instruct", **IGNORED)
    check_streamed_reply(client, "smollm2-135m-instruct")
    assert [r["outcome"] for r in handle.rows()] == ["ok", "ok"]
    listed = client.models.with_raw_response.list()
    models = [Model.model_validate(entry) for entry in json.loads(listed.text)["data"]]
    assert [(m.id, m.object) for m in models] == [("auto", "model"), ("smollm2-135m-instruct", "model")]
    one = client.models.with_raw_response.retrieve("smollm2-135m-instruct")
    assert Model.model_validate(json.loads(one.text)) == models[1]


def test_replies_validate_against_the_sdk_models_cloud(daemon_factory: Any, proxy: FaultProxy) -> None:
    """The cloud's answer is passed on in OpenAI's shape too, and the ignored hints reach no endpoint (a
    ``reasoning_effort`` sent to a model of another kind is refused there, failing the cloud attempt)."""
    _, base = http_daemon(daemon_factory, cloud_config(proxy.base_url, timeout_s=30.0))
    client = sdk(base)
    check_whole_reply(client, "cloud-small", **IGNORED)
    check_streamed_reply(client, "cloud-small")
    sent = [seen.body for seen in proxy.chat_requests()]
    assert len(sent) == 2 and not set(IGNORED) & {key for body in sent for key in body}


def test_an_assistant_refusal_sent_back_is_what_the_model_is_shown(daemon_factory: Any, proxy: FaultProxy) -> None:
    """OpenAI's model declines with ``refusal`` and null ``content``, and the SDK's ``message.model_dump()``
    sends it back so (or as a ``refusal`` content part): the model was shown an empty answer where it had
    declined, and a refusal part was a 400."""
    _, base = http_daemon(daemon_factory, cloud_config(proxy.base_url, timeout_s=30.0))
    client = sdk(base)
    declined = {"role": "assistant", "content": None, "refusal": "I can't help with that.", "tool_calls": None}
    parts = {"role": "assistant", "content": [{"type": "refusal", "refusal": "Nor with that."}]}
    question = {"role": "user", "content": "Why not?"}
    messages: Any = [{"role": "user", "content": "Pick a lock."}, declined, question, parts, question]
    client.chat.completions.create(model="auto", messages=messages, max_tokens=4)
    sent = proxy.chat_requests()[-1].body["messages"]
    assert [m["content"] for m in sent if m["role"] == "assistant"] == ["I can't help with that.", "Nor with that."]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="auto", messages=[{**declined, "refusal": 3}, question])
    assert refused.value.param == "messages[0].refusal"
