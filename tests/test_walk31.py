"""Walk 31: an agent framework's or LLM app library's developer pointing the fields such code sends
(sampling settings, JSON mode and schemas, tool calls in the history) at both doors, on a local turn and a
cloud turn. Each against a real daemon with the real model, the real loopback cloud behind the recording
proxy, the real `openai` SDK and `locod.client`."""

from __future__ import annotations

import json
import re
from typing import Any

import openai
import pytest

from .conftest import MODEL_NAME, SECRET, DaemonHandle, cloud_config, free_port
from .faultproxy import FaultProxy

CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20}},
    "required": ["city", "country"],
    "additionalProperties": False,
}
AS_SCHEMA = {"type": "json_schema", "json_schema": {"name": "capital", "schema": CITY, "strict": True}}
ASK = [{"role": "user", "content": "What is the capital of France? Answer as JSON."}]


def _door(daemon_factory: Any, proxy: FaultProxy) -> tuple[DaemonHandle, openai.OpenAI]:
    """A daemon routing `auto` with the loopback cloud configured, and an OpenAI client on its HTTP door."""
    port = free_port()
    config = {**cloud_config(proxy.base_url, mode="auto", timeout_s=60.0), "http": {"listen": f"127.0.0.1:{port}"}}
    handle = daemon_factory(config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
    return handle, client


def _city(text: str | None) -> dict[str, Any]:
    answer = json.loads(text or "")
    assert set(answer) == {"city", "country"} and all(isinstance(v, str) for v in answer.values()), answer
    return answer  # type: ignore[no-any-return]


def test_top_p_and_the_penalties_change_a_local_answer_and_reach_the_cloud(
    daemon_factory: Any, proxy: FaultProxy
) -> None:
    """Walk finding: `top_p`, `frequency_penalty` and `presence_penalty` were silently ignored on both doors
    (documented as "sampling hints"): a framework's `top_p=0` for a repeatable answer, or a penalty against a
    repeating one, changed nothing. Now they reach llama.cpp and the cloud endpoint."""
    handle, client = _door(daemon_factory, proxy)
    story = [{"role": "user", "content": "Write the word cat five times, then the word dog five times."}]

    def local(**fields: Any) -> str:
        answer = client.chat.completions.create(model=MODEL_NAME, messages=story, max_tokens=16, **fields)  # type: ignore[arg-type]
        return answer.choices[0].message.content or ""

    # top_p 0 keeps the likeliest token alone: at temperature 2 two seeds then write the same answer
    assert local(temperature=2.0, seed=1, top_p=0.0) == local(temperature=2.0, seed=2, top_p=0.0)
    plain = local(temperature=0.0)
    assert local(temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0) != plain
    # the socket takes them by the same names and rules
    with handle.client() as c:
        assert c.ask(messages=story, force="local", max_tokens=16, temperature=0.0).text == plain
        penalised = c.ask(messages=story, force="local", max_tokens=16, temperature=0.0, presence_penalty=2.0)
        assert penalised.text != plain
    with pytest.raises(openai.BadRequestError) as wide:
        client.chat.completions.create(model="auto", messages=story, top_p=1.5)
    assert (wide.value.code, wide.value.param) == ("bad_field", "top_p")
    assert "'top_p' must be a number between 0 and 1" in wide.value.message

    cloud = client.chat.completions.create(
        model="cloud-small", messages=story, max_tokens=4, top_p=0.5, frequency_penalty=0.25, presence_penalty=-0.5
    )
    assert cloud.model_extra and cloud.model_extra["locod"]["location"] == "cloud"
    sent = proxy.chat_requests()[-1].body
    assert (sent["top_p"], sent["frequency_penalty"], sent["presence_penalty"]) == (0.5, 0.25, -0.5)
    untouched = client.chat.completions.create(model="cloud-small", messages=story, max_tokens=4)
    assert untouched.choices[0].message.content is not None
    assert not {"top_p", "frequency_penalty", "presence_penalty"} & set(proxy.chat_requests()[-1].body)


def test_json_mode_and_a_schema_are_honoured_locally_and_in_the_cloud(daemon_factory: Any, proxy: FaultProxy) -> None:
    """Walk finding: `response_format` (LangChain's and the AI SDK's structured output, an editor plugin's JSON
    mode) was refused, 400 `unsupported_parameter`, though llama.cpp holds an answer to JSON with a grammar and
    the cloud takes the field. Now a local answer follows it (a schema too: llama-cpp-python itself reads no
    `json_schema`), streamed or not, and a cloud model is sent it."""
    handle, client = _door(daemon_factory, proxy)
    held: dict[str, Any] = {"max_tokens": 100, "temperature": 0.0, "response_format": AS_SCHEMA}  # room for both
    whole = client.chat.completions.create(model=MODEL_NAME, messages=ASK, **held)
    assert whole.choices[0].finish_reason == "stop"
    _city(whole.choices[0].message.content)
    chunks = client.chat.completions.create(model=MODEL_NAME, messages=ASK, stream=True, **held)
    _city("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
    anything = client.chat.completions.create(
        model=MODEL_NAME, messages=ASK, max_tokens=40, temperature=0.0, response_format={"type": "json_object"}
    )
    assert (anything.choices[0].message.content or "").startswith("{"), anything.choices[0].message.content
    with handle.client() as c:  # the socket's options, by OpenAI's shape
        _city(c.ask(messages=ASK, force="local", max_tokens=100, temperature=0.0, response_format=AS_SCHEMA).text)

    cloud = client.chat.completions.create(
        model="cloud-small", messages=ASK, max_tokens=40, response_format={"type": "json_object"}
    )
    assert cloud.model_extra and cloud.model_extra["locod"]["location"] == "cloud"
    assert proxy.chat_requests()[-1].body["response_format"] == {"type": "json_object"}
    assert (cloud.choices[0].message.content or "").startswith("{")


def test_a_cloud_that_refuses_a_schema_falls_back_to_a_local_answer_that_follows_it(
    daemon_factory: Any, proxy: FaultProxy
) -> None:
    """llama.cpp's server, like other OpenAI-compatible endpoints, takes JSON mode but refuses `json_schema`
    (llama-cpp-python's with a 500): the turn falls back to the local model, which follows the schema, and the
    fallback says why. The refusal is the request's, not the endpoint's failing: it is not asked again, and
    however many such turns there are, the endpoint's breaker stays shut for the turns it does answer."""
    _, client = _door(daemon_factory, proxy)
    as_schema: dict[str, Any] = {"max_tokens": 100, "temperature": 0.0, "response_format": AS_SCHEMA}
    for turn in range(4):  # cloud_config's breaker opens after 3 failed turns in a row
        answer = client.chat.completions.create(model="cloud-small", messages=ASK, **as_schema)
        locod = answer.model_extra["locod"] if answer.model_extra else {}
        assert len(proxy.chat_requests()) == turn + 1, "asked once, never again"
        assert proxy.chat_requests()[-1].body["response_format"] == AS_SCHEMA
        assert locod["outcome"] == "fallback" and "may not take this response_format" in locod["fallback"], locod
        _city(re.sub(r"^\[locod: [^\n]*\]\n\n", "", answer.choices[0].message.content or ""))  # docs/http.md's
    plain = client.chat.completions.create(model="cloud-small", messages=ASK, max_tokens=4)
    assert plain.model_extra and plain.model_extra["locod"]["location"] == "cloud", plain.model_extra


def test_what_cannot_be_honoured_is_refused_by_name(daemon_factory: Any, proxy: FaultProxy) -> None:
    """A schema llama.cpp cannot turn into a grammar, a response format in another shape, and an assistant
    message whose tool calls would be dropped unseen are refused naming the field, on both doors."""
    handle, client = _door(daemon_factory, proxy)
    remote = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "https://example.com/s.json"}}}
    with pytest.raises(openai.BadRequestError) as unfollowed:
        client.chat.completions.create(model=MODEL_NAME, messages=ASK, response_format=remote)  # type: ignore[arg-type]
    assert unfollowed.value.code == "bad_field"
    assert "'response_format': a local model cannot follow this JSON schema" in unfollowed.value.message
    assert not handle.rows(), "refused before it was accepted: nothing recorded"

    llama_style = {"type": "json_object", "schema": CITY}  # a schema where llama.cpp's server takes one
    with pytest.raises(openai.BadRequestError) as shape:
        client.chat.completions.create(model="auto", messages=ASK, response_format=llama_style)  # type: ignore[arg-type]
    assert (shape.value.code, shape.value.param) == ("bad_field", "response_format")
    assert "of type \"json_object\" has keys locod would leave unread, ['schema']" in shape.value.message
    with handle.client() as c, pytest.raises(Exception) as socket:
        c.ask(messages=ASK, response_format={"type": "json_schema"})
    assert "options.response_format" in str(socket.value) and 'needs "json_schema"' in str(socket.value)

    weather = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as tools:  # what to do instead: ask for JSON, which is honoured
        client.chat.completions.create(model="auto", messages=ASK, tools=[weather])  # type: ignore[list-item]
    assert (tools.value.code, tools.value.param) == ("unsupported_parameter", "tools")
    assert "locod, which calls no tools; send the request without it (a structured answer" in tools.value.message

    called = {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
              "function": {"name": "weather", "arguments": "{}"}}]}  # fmt: skip
    with pytest.raises(openai.BadRequestError) as calls:
        client.chat.completions.create(model="auto", messages=[*ASK, called, *ASK])  # type: ignore[list-item]
    assert calls.value.param == "messages[1]"
    assert "an assistant message's tool calls are not supported by locod" in calls.value.message
    assert not handle.rows()
