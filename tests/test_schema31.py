"""Attack on walk 31's `response_format`: hostile JSON schemas through both doors of a real daemon (the real
model, llama.cpp's own grammar code, the real `openai` SDK and `locod.client`). What llama.cpp makes of a
schema's grammar runs natively on the local model's thread, where a failure is the whole daemon's."""

from __future__ import annotations

import json
import re
from typing import Any

import openai
import pytest

from locod.errors import LocodError

from .conftest import MODEL_NAME, DaemonHandle, free_port

CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}},
    "required": ["city"],
    "additionalProperties": False,
}


def _as_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}


def _door(daemon_factory: Any) -> tuple[DaemonHandle, openai.OpenAI]:
    port = free_port()
    handle = daemon_factory({"http": {"listen": f"127.0.0.1:{port}"}})
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
    return handle, client


# Each crashed or stalled the daemon: a grammar llama.cpp's parser refuses (too many nested repetitions, no
# alternative, left recursion) leaves a null sampler that the first token dereferences (SIGSEGV), one that
# admits no character aborts it (SIGABRT), the converter writes a minLength of 10^9 out as 5 GB, and 5000
# enum values took seconds per token with the local model held.
HOSTILE: list[tuple[dict[str, Any], str]] = [
    ({"type": "string", "maxLength": 5000}, "maxLength 5000 is over the 1000"),
    ({"type": "string", "pattern": "^[^\\x00-\\U0010FFFF]$"}, "matches no character a model can write"),
    ({"anyOf": []}, "llama.cpp's grammar parser refuses"),
    ({"properties": {"a": {"$ref": "#/properties/a"}}, "required": ["a"]}, "parser refuses"),  # a ::= a
    ({"type": "string", "minLength": 10**9}, "minLength 1000000000 is over the 1000"),
    ({"type": "string", "pattern": "^a{0,99999}$"}, "repetition {99999} is over the 1000"),
    ({"enum": [f"value {i}" for i in range(5000)]}, "enums hold over 1000 values"),
    ({"type": "object", "properties": {f"k{i}": {"type": "string"} for i in range(5000)}}, "grows past 128 KiB"),
]


def test_hostile_schemas_are_refused_by_name_and_the_daemon_answers_on(daemon_factory: Any) -> None:
    """Attack finding: `{"type": "string", "maxLength": 5000}` (over about 1000, llama.cpp's parser refuses
    the nested repetitions; deeper, it overflows the thread's stack), `{"anyOf": []}` and a pattern whose class
    matches nothing each killed the daemon at the answer's first token, for every client; `minLength` 10^9 had
    the converter write 5 GB. Each is now refused before the turn is accepted, 400 `bad_field` saying why, on
    both doors, and the daemon goes on answering schemas within the bounds."""
    handle, client = _door(daemon_factory)
    for schema, why in HOSTILE:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(
                model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], response_format=_as_schema(schema)
            )  # type: ignore[call-overload]
        assert refused.value.code == "bad_field" and why in refused.value.message, refused.value.message
        assert handle.proc.poll() is None, f"the daemon died on {json.dumps(schema)[:80]}:\n{handle.log()[-2000:]}"
    with handle.client() as c:
        for schema, why in HOSTILE[:2]:
            with pytest.raises(LocodError) as socket:
                c.ask("Hi", force="local", response_format=_as_schema(schema))
            assert socket.value.code == "bad_field" and why in socket.value.message
        assert not handle.rows(), "refused before it was accepted: nothing recorded"
        answer = c.ask(
            "What is the capital of France? Answer as JSON.",
            force="local",
            max_tokens=60,
            temperature=0.0,
            response_format=_as_schema(CITY),
        )
    assert set(json.loads(answer.text)) == {"city"}
    with_a_keyword_name = {  # a property named like a keyword is a property, not a bound
        "type": "object",
        "properties": {"maxLength": {"type": "integer"}, "pattern": {"type": "string", "maxLength": 8}},
        "required": ["maxLength", "pattern"],
    }
    named = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Answer as JSON."}],
        max_tokens=60,
        temperature=0.0,
        response_format=_as_schema(with_a_keyword_name),
    )  # type: ignore[call-overload]
    assert set(json.loads(named.choices[0].message.content or "")) == {"maxLength", "pattern"}


def test_a_recursive_model_whose_root_is_a_ref_is_followed(daemon_factory: Any) -> None:
    """Attack finding: pydantic writes a recursive model (a tree) as `{"$defs": {...}, "$ref": "#/$defs/Node"}`;
    llama.cpp's converter reads nothing beside a root `$ref`, so the `$ref`s inside `$defs` stayed unresolved and
    the schema was refused ("'#/$defs/Node'"). Now it is followed: the answer is a node."""
    _, client = _door(daemon_factory)
    node = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "kids": {"type": "array", "maxItems": 0,
                       "items": {"$ref": "#/$defs/Node"}}},
        "required": ["name", "kids"],
    }  # fmt: skip
    tree = {"$defs": {"Node": node}, "$ref": "#/$defs/Node"}
    answer = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "A family tree as JSON."}],
        max_tokens=60,
        temperature=0.0,
        response_format=_as_schema(tree),
    )  # type: ignore[call-overload]
    assert set(json.loads(answer.choices[0].message.content or "")) == {"name", "kids"}


def test_a_string_held_to_a_schema_holds_no_raw_control_character(daemon_factory: Any) -> None:
    """Attack finding: llama.cpp's converter lets a schema's string hold any character but a quote or a
    backslash: asked for a poem as `{"text": ...}`, the model wrote its line breaks raw into the string, and
    the answer was JSON no parser reads ("Invalid control character"). Now a string's characters are JSON's
    (a line break is written `\\n`), on both doors."""
    handle, client = _door(daemon_factory)
    text = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    poem: Any = [{"role": "user", "content": "Write a poem of four lines."}]
    held: dict[str, Any] = {"max_tokens": 60, "temperature": 0.0, "response_format": _as_schema(text)}
    answer = client.chat.completions.create(model=MODEL_NAME, messages=poem, **held)
    with handle.client() as c:
        socket = c.ask(messages=poem, force="local", **held).text
    for written in (answer.choices[0].message.content or "", socket):
        assert written.startswith("{") and not re.search(r"[\x00-\x1f]", written), repr(written)
