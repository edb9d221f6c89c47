"""Walk 32: a developer who wants JSON answers and a hard spending limit, through the HTTP door with the
real `openai` SDK: pydantic models through `client.chat.completions.parse`, a seeded answer twice, a cloud
model with prices and a daily cap (the loopback cloud as the provider), and a long answer stopped from the
client. Each against a real daemon with the real model and the real loopback cloud behind the proxy."""

from __future__ import annotations

import json
import socket
from typing import Any

import openai
from pydantic import BaseModel

from .conftest import MODEL_NAME, SECRET, DaemonHandle, cloud_config, free_port, wait_for
from .faultproxy import FaultProxy
from .test_cancel31 import LONG_PROMPT  # about 14,000 tokens: read on one thread, far from done when its client leaves

ASK = [{"role": "user", "content": "What is the capital of France? Answer as JSON."}]


SHORT = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20}},
    "required": ["city", "country"],
    "additionalProperties": False,
}


class Capital(BaseModel):
    city: str
    country: str


def _door(daemon_factory: Any, proxy: FaultProxy, **cloud: Any) -> tuple[DaemonHandle, openai.OpenAI]:
    """A daemon routing `auto` with the loopback cloud configured, and an OpenAI client on its HTTP door."""
    port = free_port()
    config = {
        **cloud_config(proxy.base_url, mode="auto", timeout_s=60.0, **cloud),
        "http": {"listen": f"127.0.0.1:{port}"},
    }
    handle = daemon_factory(config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
    return handle, client


def test_a_json_answer_after_a_cloud_fallback_parses_whole(daemon_factory: Any, proxy: FaultProxy) -> None:
    """Walk finding: `client.chat.completions.parse(model="auto", response_format=Capital)` routed to a cloud
    endpoint that refuses `json_schema` (llama-cpp-python's server) raised pydantic's `ValidationError`: the
    local model's JSON, answering instead, came after the door's `[locod: the cloud answer failed ...]` line,
    which a chat UI reads but no JSON parser takes. An answer asked for as JSON now starts with its JSON; the
    notice is in the `locod` object alone, streamed or not."""
    _, client = _door(daemon_factory, proxy)
    parsed = client.chat.completions.parse(model="cloud-small", messages=ASK, response_format=Capital, max_tokens=60)  # type: ignore[arg-type]
    assert parsed.model_extra is not None
    locod = parsed.model_extra["locod"]
    assert locod["location"] == "local" and locod["outcome"] == "fallback" and locod["fallback"]
    message = parsed.choices[0].message
    assert isinstance(message.parsed, Capital) and not (message.content or "").startswith("[locod:")

    stream = client.chat.completions.create(
        model="cloud-small",
        messages=ASK,  # type: ignore[arg-type]
        max_tokens=60,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": SHORT}},
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert set(json.loads(text)) == {"city", "country"}, text

    plain = client.chat.completions.create(model="cloud-small", messages=ASK, max_tokens=8)  # type: ignore[arg-type]
    assert plain.model_extra is not None and plain.model_extra["locod"]["location"] == "cloud"


def test_status_says_what_is_left_of_the_daily_cap(daemon_factory: Any, proxy: FaultProxy) -> None:
    """Walk finding: with $0.44 of a $0.50 cap spent, `locod status` said "today $0.442 of the $0.50 cap" while
    every cloud turn of that size stayed local ("more than the $0.058 left"): what is left, which each
    decision compares with, was in no line of status. It now says it."""
    handle, client = _door(daemon_factory, proxy, daily_cap_usd=1.0)
    answer = client.chat.completions.create(model="cloud-small", messages=ASK, max_tokens=8)  # type: ignore[arg-type]
    assert answer.model_extra is not None and answer.model_extra["locod"]["location"] == "cloud"
    spent = answer.model_extra["locod"]["cost_usd"]
    assert spent > 0
    shown = handle.cli("status").stdout
    assert "of the $1.00 cap (" in shown and " left)" in shown, shown


def test_a_client_that_hangs_up_on_a_long_prompt_over_http_frees_the_model(daemon_factory: Any) -> None:
    """Walk finding: an SDK call with a long prompt, given up on by its client's timeout, stopped the prompt's
    reading (the daemon's log said so, `status --json` counted it), but `locod status`, where a user looks
    for a model held, said nothing of it. Over the HTTP door, as over the socket: the reading stops, status
    says so, and the next turn is answered."""
    port = free_port()
    model = {"name": MODEL_NAME, "path": "SmolLM2-135M-Instruct.Q4_1.gguf", "n_ctx": 16384}
    handle = daemon_factory({"http": {"listen": f"127.0.0.1:{port}"}, "local": {"n_threads": 1, "models": [model]}})
    body = json.dumps(
        {"model": MODEL_NAME, "stream": True, "max_tokens": 8, "messages": [{"role": "user", "content": LONG_PROMPT}]}
    ).encode()
    leaver = socket.create_connection(("127.0.0.1", port), timeout=60)
    leaver.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    with handle.client() as c:
        wait_for(lambda: c.status()["queue"]["in_flight"] == 1, 120, "the long prompt's turn to be accepted")
        leaver.close()  # the stream's headers wait for its first text: nothing was read yet
        wait_for(lambda: c.status()["local"]["prompts_stopped"]["turns"] == 1, 300, "the reading to stop")
        assert c.ask("Say hi.", force="local", max_tokens=4).done.location == "local"
    shown = handle.cli("status").stdout
    assert "1 prompt reading stopped by a cancel (" in shown, shown
    assert [row["outcome"] for row in handle.rows()] == ["cancelled", "ok"]
