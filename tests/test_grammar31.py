"""Attack round on walk 31's `response_format`, what it left: a schema's `pattern` let a local answer out of
JSON, a grammar llama.cpp refused was written whole into the daemon's log, annotations-only schemas and
unread `json_schema` keys, and a cloud 500 echoing the request that never opened the breaker. Each against a
real daemon with the real model, the real loopback cloud behind the recording proxy, the real `openai` SDK."""

from __future__ import annotations

import json
import re
from typing import Any

import openai
import pytest

from .conftest import MODEL_NAME, SECRET, DaemonHandle, cloud_config, free_port
from .faultproxy import Fault, FaultProxy

ASK = [{"role": "user", "content": 'Write a short poem about "quotes", with line breaks and tabs.'}]


def _door(daemon_factory: Any, proxy: FaultProxy | None = None) -> tuple[DaemonHandle, openai.OpenAI]:
    port = free_port()
    config: dict[str, Any] = {"http": {"listen": f"127.0.0.1:{port}"}}
    env = {}
    if proxy is not None:
        config = {**cloud_config(proxy.base_url, mode="auto", timeout_s=60.0, max_retries=0), **config}
        env = {"LOCOD_CLOUD_API_KEY": SECRET}
    handle = daemon_factory(config, extra_env=env)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
    return handle, client


def _as_schema(schema: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, **spec}}


def _local(client: openai.OpenAI, response_format: dict[str, Any], max_tokens: int = 120) -> tuple[str, str]:
    fields: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0.0, "response_format": response_format}
    answer = client.chat.completions.create(model=MODEL_NAME, messages=ASK, **fields)
    return answer.choices[0].message.content or "", answer.choices[0].finish_reason


# Patterns whose `.` or class admits a quote, a backslash or a control character: llama.cpp's converter wrote
# the pattern as the string's JSON text, so the model wrote them raw and the answer was no JSON.
PATTERNS = ["^.{40}$", "^[^a]{40}$", '^[ -~\\t\\n"]{40}$', "^[\\s\\S]{40}$", '^a"b\\\\c\\n$']


def test_a_pattern_held_answer_always_parses_and_matches_its_pattern(daemon_factory: Any) -> None:
    """Attack finding: a string's `pattern` let a local answer hold a raw `"` or line break (the pattern's
    `.` and classes were written as the JSON text's characters), and `json.loads` failed on it. Now each
    character the pattern matches is written as JSON writes it: the answer parses, and its string matches."""
    _, client = _door(daemon_factory)
    for pattern in PATTERNS:
        poem_schema = {"type": "string", "pattern": pattern}
        schema = {"type": "object", "properties": {"poem": poem_schema}, "required": ["poem"]}
        text, finish = _local(client, _as_schema(schema), max_tokens=400)
        assert finish == "stop", (pattern, text)
        poem = json.loads(text)["poem"]
        assert re.fullmatch(pattern[1:-1], poem, re.DOTALL if "\\s\\S" in pattern else 0), (pattern, poem)
    nul, _ = _local(client, _as_schema({"type": "string", "pattern": "^\\x00$"}))
    assert json.loads(nul) == "\x00", "a NUL the pattern asks for is written \\u0000"


def test_a_refused_grammar_is_logged_as_one_line_never_whole(daemon_factory: Any) -> None:
    """Attack finding: llama.cpp's parser wrote a refused grammar whole into the daemon's log, up to 128 KiB a
    request, so a client could flood the journal. Now the refusal logs the parser's reason as one line, and the
    client is told that reason."""
    handle, client = _door(daemon_factory)
    marker = "zebra_marker_in_the_grammar"
    properties = {f"{marker}_{i}": {"type": "string"} for i in range(20)} | {"bad": {"anyOf": []}}
    schema = {"type": "object", "properties": properties, "required": list(properties)}
    with pytest.raises(openai.BadRequestError) as refused:
        _local(client, _as_schema(schema))
    log = handle.log()
    assert marker not in log, "the grammar is not logged"
    assert "error parsing grammar" not in log, "llama.cpp's own lines are not passed on"
    assert len([line for line in log.splitlines() if "refused a schema's grammar" in line]) == 1, log[-2000:]
    assert refused.value.code == "bad_field"
    assert "llama.cpp's grammar parser refuses what it makes of it: expecting" in refused.value.message


ANY_VALUE = [{}, {"title": "Anything"}, {"description": "whatever you like", "x-note": 1}]


def test_a_schema_of_annotations_alone_admits_any_value(daemon_factory: Any) -> None:
    """Attack finding: schemas JSON Schema reads as "any value" (`{}`, a `title` or `description` alone,
    unknown keywords) were refused, 400 "Unrecognized schema". Now one admits any JSON value; at the root an
    object, as JSON mode (OpenAI holds a schema's root to an object)."""
    _, client = _door(daemon_factory)
    for schema in ANY_VALUE:
        root, finish = _local(client, _as_schema(schema), max_tokens=60)
        assert finish == "length" or isinstance(json.loads(root), dict), (schema, root)
        assert root.startswith("{"), (schema, root)
        nested = {"type": "object", "properties": {"note": schema, "n": {"type": "integer"}}, "required": ["note", "n"]}
        text, finish = _local(client, _as_schema(nested), max_tokens=200)
        assert finish == "stop", (schema, text)
        assert set(json.loads(text)) == {"note", "n"}, (schema, text)


def test_json_schema_keys_beside_openais_are_refused_by_name(daemon_factory: Any) -> None:
    """Attack finding: keys inside `json_schema` other than OpenAI's were silently ignored. `strict` and
    `description` (OpenAI's) are taken; any other is refused by name, on both doors."""
    handle, client = _door(daemon_factory)
    city = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
    text, _ = _local(client, _as_schema(city, strict=True, description="the capital"), max_tokens=40)
    assert set(json.loads(text)) == {"city"}
    with pytest.raises(openai.BadRequestError) as extra:
        _local(client, _as_schema(city, extra=1))
    assert (extra.value.code, extra.value.param) == ("bad_field", "response_format")
    assert "json_schema keys locod would leave unread, ['extra']" in extra.value.message
    with handle.client() as c, pytest.raises(Exception) as socket:
        c.ask(messages=ASK, force="local", response_format=_as_schema(city, extra=1))
    assert "options.response_format" in str(socket.value) and "['extra']" in str(socket.value)


def test_a_cloud_500_that_echoes_response_format_still_opens_the_breaker(
    daemon_factory: Any, proxy: FaultProxy
) -> None:
    """Attack finding: any 500 whose message held "response_format" was read as the endpoint refusing the
    field, so an endpoint failing with the request echoed never opened its breaker for JSON-mode turns. Now
    only a 400 or 422 naming it, or llama-cpp-python's validation error, is the request's fault: the echoing
    500s open the breaker, and the turns after it are not sent to the failing endpoint."""
    _, client = _door(daemon_factory, proxy)
    echoed = json.dumps({"messages": ASK, "response_format": {"type": "json_object"}})
    proxy.set(Fault(kind="status", status=500, message=f"internal error handling {echoed}"))
    for _ in range(4):  # cloud_config's breaker opens after 3 failed turns in a row
        try:
            client.chat.completions.create(
                model="cloud-small", messages=ASK, max_tokens=30, response_format={"type": "json_object"}
            )
        except openai.APIStatusError:
            pass  # whether the turn falls back or fails, what counts is what reached the endpoint
    assert len(proxy.chat_requests()) == 3, "the fourth turn found the breaker open"
