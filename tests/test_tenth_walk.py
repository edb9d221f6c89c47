"""A tenth new user's walk: someone coming from Ollama and LiteLLM who points OpenAI-SDK code at locod's HTTP
API and types Ollama's commands at the CLI. Each against a real daemon with the real model and, where a cloud
answers, the real loopback server behind the fault proxy."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import openai
import pytest

from locod.cli import main

from .conftest import cloud_config, free_port
from .faultproxy import Fault, FaultProxy
from .test_escalation import CLOUD, LOCAL, QUESTION, _daemon, _head
from .test_http import http_daemon, png, sdk


def test_the_location_header_says_where_an_escalated_answer_came_from_and_decisions_finds_it(
    daemon_factory: Any, tmp_path: Path, proxy: FaultProxy
) -> None:
    """Walk finding: an answer the cloud wrote after the local one was not sure enough came with
    ``x-locod-location: local`` (the decision's first place), streamed or not; and the decision id that header
    gives, or the completion's own id, could not be looked up: `locod decisions 15` was "unrecognized
    arguments"."""
    port = free_port()
    head = _head(min_weight=1000.0, bias=10.0)  # never sure: every turn escalates
    handle = _daemon(daemon_factory, tmp_path, proxy, head, "walk10", http={"listen": f"127.0.0.1:{port}"})
    client = sdk(f"http://127.0.0.1:{port}")
    ask: Any = {"model": "auto", "messages": QUESTION, "max_tokens": 12, "temperature": 0.0}
    whole = client.chat.completions.with_raw_response.create(**ask)
    streamed = client.chat.completions.with_raw_response.create(**ask, stream=True)
    chunks = list(streamed.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert {c.model for c in chunks} == {CLOUD}  # the role chunk too: the escalation was known before it
    for raw in (whole, streamed):
        assert raw.headers["x-locod-location"] == "cloud"
    completion = whole.parse()
    assert (completion.model_extra or {})["locod"]["outcome"] == "escalated" and completion.model == CLOUD

    decision = whole.headers["x-locod-decision"]
    for key in (decision, completion.id):  # the header's id, and the id an SDK user logs
        shown = handle.cli("decisions", key, "--json")
        assert shown.returncode == 0, shown.stderr
        (row,) = json.loads(shown.stdout)
        assert (str(row["id"]), row["request_id"], row["backend"]) == (decision, completion.id, "cloud")
    missing = handle.cli("decisions", "chatcmpl-nope")
    assert missing.returncode != 0 and "no decision record has the id 'chatcmpl-nope'" in missing.stderr


def test_a_stream_that_fails_before_its_first_text_gets_its_http_status(daemon_factory: Any, proxy: FaultProxy) -> None:
    """Walk finding: a streamed turn whose cloud failed and whose local fallback could not take the prompt was
    answered 200, then an ``error`` event: the SDK raised a bare APIError while iterating, with no status for
    its retry logic, where the same request unstreamed got 502."""
    handle, base = http_daemon(daemon_factory, cloud_config(proxy.base_url, max_retries=0))
    proxy.set(Fault(kind="status", status=500))
    too_long_for_local: Any = [{"role": "user", "content": "word " * 2500}]
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as failed:  # raised by create itself, streamed or not
            client = sdk(base)
            client.chat.completions.create(model=CLOUD, messages=too_long_for_local, max_tokens=4, stream=stream)
        assert failed.value.status_code == 502, (stream, failed.value)
        assert "local fallback failed" in failed.value.message
    assert [r["outcome"] for r in handle.rows()] == ["error", "error"]


def test_refusals_say_what_to_send_and_when_to_retry(daemon_factory: Any) -> None:
    """Walk findings: a model name typo (`smollm2`, Ollama's `smollm2:135m`) was told only that it does not
    exist; `tools` and `logprobs` only that they are unsupported; a 429 carried no Retry-After."""
    handle, base = http_daemon(daemon_factory, {"daemon": {"queue_limit": 1}})
    client = sdk(base)
    ask: Any = [{"role": "user", "content": "Hello"}]
    with pytest.raises(openai.NotFoundError) as typo:
        client.chat.completions.create(model="smollm2:135m", messages=ask)
    assert f"send 'auto' or one of '{LOCAL}'" in typo.value.message
    with pytest.raises(openai.NotFoundError) as retrieved:  # what editor plugins ask before they chat
        client.models.retrieve("smollm2:135m")
    assert retrieved.value.message == typo.value.message
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="auto", messages=ask, logprobs=True)
    assert refused.value.message.endswith("'logprobs' is not supported by locod; send the request without it")

    with client.chat.completions.with_streaming_response.create(
        model="auto", messages=ask, max_tokens=1000, stream=True
    ) as stream:  # the turn is generating: the one slot of the queue is taken
        with pytest.raises(openai.RateLimitError) as busy:
            client.chat.completions.create(model="auto", messages=ask, max_tokens=4)
        assert busy.value.response.headers["retry-after"] == "1"  # the SDKs wait that long, then retry
        assert stream.headers["x-locod-location"] == "local"
    assert handle.rows()


@pytest.mark.parametrize(
    ("typed", "told"),
    [
        (["run", "smollm2"], "`locod chat`"),
        (["list"], "`locod models list`"),
        (["ps"], "`locod status`"),
        (["pull", "hf://x/y/z.gguf"], "`locod models pull SOURCE`"),
        (["--config", "run", "rm", "x"], "`locod models rm NAME`"),  # a global option's value is not the command
    ],
)
def test_ollamas_commands_say_which_locod_command_does_that(
    typed: list[str], told: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Walk finding: `locod run`, `list`, `ps`, `pull`, `rm` (Ollama's habits) were argparse's "invalid
    choice" with the list of commands, leaving the user to guess `models list` for `list`, `status` for `ps`."""
    assert main(typed) == 2  # a usage error main says and returns (clifuzz41's _Wrong), as argparse's exit 2
    assert told in capsys.readouterr().err


def test_a_second_daemon_on_the_first_ones_http_port_says_to_choose_another(daemon_factory: Any) -> None:
    """Walk finding: a second daemon (another user's, or a second config) whose ``http.listen`` a running one
    already serves stopped with "Address already in use" alone, naming neither the likely holder nor the key."""
    first, base = http_daemon(daemon_factory)
    second = daemon_factory({"http": {"listen": base.removeprefix("http://")}}, name="second", wait=False)
    assert second.proc.wait(120) != 0
    assert "Address already in use (another program, another locod?): set http.listen to a free port" in second.log()
    with first.client() as client:  # the first one serves on
        assert client.ping()["pong"]


def test_status_says_the_http_api_is_off_and_how_to_turn_it_on(daemon_factory: Any) -> None:
    """Walk finding: coming from Ollama (which serves its API by default), the user found no API on any port
    and `locod status`, which lists it when it runs, said nothing of it."""
    shown = daemon_factory().cli("status")
    assert "http  off: set http.listen to serve it (`locod serve --set http.listen=127.0.0.1:8080" in shown.stdout


def test_a_fallback_says_the_local_model_did_not_see_the_image(daemon_factory: Any, proxy: FaultProxy) -> None:
    """Walk finding: an image sent to a named cloud model whose answer failed was answered by the local model,
    which cannot see images, and nothing said so: the decision's notice was made for the cloud, which could,
    and the fallback message spoke only of the cloud's failure."""
    _, base = http_daemon(daemon_factory, cloud_config(proxy.base_url, max_retries=0))
    proxy.set(Fault(kind="status", status=500))
    url = "data:image/png;base64," + base64.b64encode(png()).decode()
    question: Any = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]
    ask: Any = {"model": CLOUD, "messages": [{"role": "user", "content": question}], "max_tokens": 4}
    answer = sdk(base).chat.completions.create(**ask)
    locod = (answer.model_extra or {})["locod"]
    assert locod["outcome"] == "fallback" and locod["location"] == "local"
    assert locod["fallback"].endswith(
        "answering locally, from the start, by a model that cannot see images (not seen: image-0)"
    )
    streamed = sdk(base).chat.completions.with_raw_response.create(**ask, stream=True)
    assert streamed.headers["x-locod-location"] == "local"  # the cloud failed before any text: known in time
    assert (list(streamed.parse())[-1].model_extra or {})["locod"]["outcome"] == "fallback"


def test_chat_leaves_on_ollamas_bye_and_sends_no_slash_command_to_the_model(daemon_factory: Any) -> None:
    """Walk finding: in `locod chat` (Ollama's `run`), `/bye` was sent to the model as a question and answered,
    and so would `/clear` or `/set` be; the chat went on."""
    handle = daemon_factory()
    shown = handle.cli("chat", "--max-tokens", "2", stdin="Hi\n/clear\n/etc/hosts\n/bye\nnever sent\n")
    assert shown.returncode == 0, shown.stderr
    assert "locod chat has no /clear: /attach FILE (or /private FILE) adds a file" in shown.stderr
    assert [row["prompt_chars"] for row in handle.rows()] == [len("Hi"), len("/etc/hosts")]  # a path is a question
