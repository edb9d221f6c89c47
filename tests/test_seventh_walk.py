"""A seventh new user's walk: everyday OpenAI-compatible tools pointed at the HTTP door, as at Ollama or
llama.cpp's server: request bodies shaped as client libraries send them, paths as people type them. Each
through a real daemon with the real model, raw HTTP and the real openai client."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import openai
import pytest

from .conftest import SECRET, DaemonHandle, cloud_config, free_port
from .faultproxy import FaultProxy

LOCAL = "smollm2-135m-instruct"


def http_daemon(factory: Any) -> tuple[DaemonHandle, str]:
    port = free_port()
    return factory(extra_env={"LOCOD_HTTP": f"127.0.0.1:{port}"}), f"http://127.0.0.1:{port}"


def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """A POST as urllib sends it (curl alike): a redirect is not followed for a POST."""
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_doubled_or_trailing_slashes_are_the_same_path(daemon_factory: Any) -> None:
    """Walk finding: ``POST /v1/chat/completions/`` was answered 307 with an empty body (urllib raised
    "HTTP Error 307", curl printed nothing) and a Location built from the request's Host header, before the
    Host check; ``GET /v1/models/`` said "the model '' does not exist"; ``/v1//chat/completions`` was a 404."""
    _, base = http_daemon(daemon_factory)
    ask = {"model": LOCAL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    status, answer = post(f"{base}/v1/chat/completions/", ask)
    assert status == 200 and answer["choices"][0]["message"]["content"], answer
    with urllib.request.urlopen(f"{base}/v1/models/", timeout=30) as response:
        assert [m["id"] for m in json.loads(response.read())["data"]] == ["auto", LOCAL]
    with urllib.request.urlopen(f"{base}/v1/models/{LOCAL}/", timeout=30) as response:
        assert json.loads(response.read())["id"] == LOCAL
    status, answer = post(f"{base}/v1//chat/completions", ask)  # a base_url ending in "/", joined by hand
    assert status == 200 and answer["choices"][0]["message"]["content"], answer


def test_client_shaped_bodies_are_taken_as_openai_takes_them(daemon_factory: Any) -> None:
    """Walk finding: an assistant message with ``content: null`` (OpenAI's own shape for a turn without
    text, which clients send back) was refused 400 "messages[1].content must be a string or a list of
    parts"; and ``max_completion_tokens: null`` beside ``max_tokens: 3`` (clients that serialize every
    field) dropped the limit: the answer ran to the default length."""
    _, base = http_daemon(daemon_factory)
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    history: Any = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "Hi again"},
    ]
    answer = client.chat.completions.create(model=LOCAL, messages=history, max_tokens=2)
    assert answer.choices[0].message.content and answer.usage is not None

    limited = client.chat.completions.create(
        model=LOCAL,
        messages=[{"role": "user", "content": "Tell me a long story."}],
        max_tokens=3,
        extra_body={"max_completion_tokens": None},
    )
    assert limited.usage is not None and limited.usage.completion_tokens == 3
    assert limited.choices[0].finish_reason == "length"


def test_an_answer_cut_by_the_context_window_finishes_for_length(daemon_factory: Any) -> None:
    """Walk finding: a local answer that filled the model's context (prompt 1722 + answer 326 = 2048
    tokens, with max_tokens 1500) came back with ``finish_reason: "stop"``, so a client took the cut answer
    for a whole one (clients continue or warn on ``length``)."""
    port = free_port()
    short = {"name": "short", "path": "SmolLM2-135M-Instruct.Q4_1.gguf", "n_ctx": 256}
    daemon_factory({"local": {"models": [short]}}, extra_env={"LOCOD_HTTP": f"127.0.0.1:{port}"})
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    ask = "The quick brown fox jumps over the lazy dog. " * 8 + "\nRepeat the sentence above 100 times."
    messages: Any = [{"role": "user", "content": ask}]
    answer = client.chat.completions.create(model="short", messages=messages, max_tokens=400, temperature=0, seed=1)
    assert answer.usage is not None and answer.usage.total_tokens == 256 and answer.usage.completion_tokens < 400
    assert answer.choices[0].finish_reason == "length"
    chunks = list(
        client.chat.completions.create(
            model="short", messages=messages, max_tokens=400, temperature=0, seed=1, stream=True
        )
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


def test_a_prompt_too_long_is_said_in_openais_words(daemon_factory: Any) -> None:
    """Walk finding: a prompt longer than the local model's context was refused 400 with "the prompt needs
    about 2945 tokens; the model's context is 2048 tokens" and no ``param``: clients that recognise a
    context overflow by OpenAI's wording ("This model's maximum context length is", LiteLLM's
    ContextWindowExceededError, which its router's context-window fallbacks act on) took it for any 400."""
    _, base = http_daemon(daemon_factory)
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=LOCAL, messages=[{"role": "user", "content": "word " * 3000}])
    assert "this model's maximum context length is 2048 tokens" in refused.value.message
    assert refused.value.code == "prompt_too_long" and refused.value.param == "messages"


def test_an_estimated_cloud_answer_counts_no_more_tokens_than_asked(daemon_factory: Any, proxy: FaultProxy) -> None:
    """Walk finding: LangChain's ChatOpenAI with ``max_tokens=8``, streamed from a cloud endpoint that reports
    no usage (llama_cpp.server), got ``usage.completion_tokens`` 9: the estimate from the answer's characters
    ran past the limit the endpoint had stopped at."""
    port = free_port()
    env = {"LOCOD_CLOUD_API_KEY": SECRET, "LOCOD_HTTP": f"127.0.0.1:{port}"}
    daemon_factory(cloud_config(proxy.base_url, timeout_s=30.0), extra_env=env)  # a loaded machine's first token
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    asked: Any = [{"role": "user", "content": "Write the word internationalization five times."}]
    answer = client.chat.completions.create(model="cloud-small", messages=asked, max_tokens=8, temperature=0, seed=1)
    text = answer.choices[0].message.content or ""
    assert len(text) >= 9 * 4, text  # an answer whose characters alone would count more than 8 tokens
    assert answer.usage is not None and answer.usage.completion_tokens == 8
    assert answer.model_extra is not None and answer.model_extra["locod"]["location"] == "cloud"
