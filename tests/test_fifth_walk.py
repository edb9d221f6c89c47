"""A fifth new user's walk: a second GGUF, the cloud's key fixed by a reload, the HTTP API from the openai
client, `locod report` against a daemon whose state is elsewhere, and the CLI's small words. Each through
the real CLI, a real daemon, the real llama_cpp.server behind the fault proxy and the real openai client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from .conftest import cloud_config, free_port
from .faultproxy import Fault, FaultProxy


def test_a_reload_that_fixes_the_key_is_tried_by_the_next_turn(
    daemon_factory: Any, proxy: FaultProxy, tmp_path: Path
) -> None:
    key = tmp_path / "cloud.key"
    key.write_text("sk-the-right-one\n")
    key.chmod(0o600)
    config = cloud_config(proxy.base_url)
    config["cloud"]["models"][0]["api_key_file"] = str(key)
    dead = f"http://127.0.0.1:{free_port()}/v1"
    config["cloud"]["models"].append({"name": "gone", "base_url": dead, "model": "gone"})
    handle = daemon_factory(config)

    proxy.set(Fault("status", status=401, times=3))
    for _ in range(3):  # breaker_failures: the endpoint's breaker opens
        refused = handle.cli("ask", "Hi", "--max-tokens", "2")
        assert refused.returncode == 0, refused.stderr  # answered locally instead
        assert f"HTTP 401 from the endpoint: check the API key, which the daemon takes from api_key_file {key}" in (
            refused.stderr
        )
    assert "breaker open" in handle.cli("status").stdout
    blocked = handle.cli("ask", "Hi", "--max-tokens", "2")
    assert "circuit breaker" in blocked.stderr and len(proxy.seen) == 3  # cooling down: not tried

    assert handle.cli("reload").returncode == 0  # the user fixed the key and reloaded
    assert "breaker closed" in handle.cli("status").stdout
    tried = handle.cli("ask", "Hi", "--max-tokens", "2")
    assert tried.returncode == 0 and "failed" not in tried.stderr and "breaker" not in tried.stderr, tried.stderr
    assert len(proxy.seen) == 4 and handle.rows()[-1]["backend"] == "cloud"

    proxy.set(Fault("status", status=404, times=1))
    wrong = handle.cli("ask", "Hi", "--max-tokens", "2")
    hint = f"check model = 'cloud-small', the endpoint's model id, and base_url = '{proxy.base_url}'"
    assert f"HTTP 404 from the endpoint: {hint}" in wrong.stderr, wrong.stderr
    down = handle.cli("ask", "Hi", "--max-tokens", "2", "--model", "gone")
    assert f"gone: endpoint {dead} unreachable" in down.stderr, down.stderr


def test_an_editor_plugins_first_calls_through_the_openai_client(daemon_factory: Any) -> None:
    port = free_port()
    daemon_factory(extra_env={"LOCOD_HTTP": f"127.0.0.1:{port}"})
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    assert client.models.retrieve("smollm2-135m-instruct").owned_by == "locod-local"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4o")
    assert "the model 'gpt-4o' does not exist" in missing.value.message
    no_v1 = openai.OpenAI(base_url=f"http://127.0.0.1:{port}", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as slipped:  # the usual first slip: base_url without /v1
        no_v1.chat.completions.create(model="auto", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert "locod serves no POST /chat/completions" in slipped.value.message
    assert "base_url ends in /v1" in slipped.value.message and slipped.value.code == "not_found"
    answer = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert answer.choices[0].message.content
    with pytest.raises(openai.APIStatusError) as method:
        client.get("/chat/completions", cast_to=object)
    assert method.value.status_code == 405 and method.value.code == "method_not_allowed"
