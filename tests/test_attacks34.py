"""Attack round 34: the daemon's log as a resource and as a record. An outside party repeating one fault
(a client's request, a turn on a full disk) must not grow the log by a line each time: the first is said
in full, the rest summarised (``logs.Throttle``), so log bytes grow far slower than what is sent. Real
daemon, real model, the real `openai` SDK on the HTTP door, a real tmpfs filled up; lines counted, never
timed."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import openai
import pytest

from .conftest import MODEL_NAME, SECRET, Context, cloud_config, free_port, start_daemon, wait_for
from .faultproxy import Fault, FaultProxy
from .test_attacks14 import dealer, receive, send, status
from .test_cancel31 import LONG_PROMPT, long_context_daemon

REPEATS = 12


def _lines(log: str, words: str) -> list[str]:
    return [line for line in log.splitlines() if words in line]


def test_schemas_the_grammar_parser_refuses_are_logged_once_not_once_a_request(daemon_factory: Any) -> None:
    """Attack finding: a `response_format` schema whose grammar llama.cpp's parser refuses (`{"anyOf": []}`)
    is refused 400 before any turn, cheaply, and was logged as a WARNING each time: a client sending them
    in a loop grew the journal by a line a request. Now the first is said in full, the rest summarised."""
    port = free_port()
    handle = daemon_factory({"http": {"listen": f"127.0.0.1:{port}"}})
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
    for i in range(REPEATS):  # each schema another, so no cache stands between the requests and the parser
        schema = {"type": "object", "properties": {f"p{i}": {"anyOf": []}}, "required": [f"p{i}"]}
        response_format: Any = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(
                model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], response_format=response_format
            )
        assert "llama.cpp's grammar parser refuses" in refused.value.message  # the client is told each time
    said = _lines(handle.log(), "refused a schema's grammar")
    assert len(said) == 1, said
    assert "expecting" in said[0], "the first is said in full, with the parser's reason"


def test_a_full_disk_says_once_that_dialogue_states_cannot_be_parked(
    tmp_path: Path, models_dir: Path, small_disk: Path
) -> None:
    """Attack finding: with ``local.cache_disk_mb`` set and the state directory's disk full, every dialogue
    state evicted from memory failed to park with a WARNING of its own: a client opening a new session per
    turn grew the log (often on that same full disk) by a line a turn. Now the first failure is said in
    full, with what to do; the rest are summarised. The turns are answered all the same."""
    local = {"cache_mb": 1, "cache_disk_mb": 64}  # each state (about 2 MiB) is evicted, and parked, at once
    home = tmp_path / "d"
    (home / "state").mkdir(parents=True)
    (home / "state" / "kvcache").symlink_to(small_disk)  # the park's disk alone fills: every turn is recorded
    handle = start_daemon(home, models_dir, {"local": local})
    try:
        client = handle.client()
        for i in range(REPEATS):
            done = client.ask("Tell me a fact about cats. " * 10, session=f"s{i}", max_tokens=2).done
            assert done.outcome == "ok"
        said = _lines(handle.log(), "could not park a dialogue's KV state")
        assert len(said) == 1, said
        assert "No space left on device" in said[0] and "local.cache_disk_mb" in said[0], said[0]
    finally:
        handle.stop()


def test_a_cloud_refusing_every_call_is_logged_once_not_once_a_turn(daemon_factory: Any) -> None:
    """Attack finding: a cloud that answers every call 400 (an endpoint that changed its API, a model field
    it no longer takes) never opens its breaker, since a 400 is the request's fault: every turn called it,
    fell back to the local model and logged a WARNING of its own, a line a turn for as long as it lasted.
    Now the first is said in full (the turn, the status); the rest are summarised, and each turn's record
    still says it fell back."""
    proxy = FaultProxy("http://127.0.0.1:9").start()  # answers every call itself: nothing upstream is asked
    try:
        proxy.set(Fault("status", status=400))
        handle = daemon_factory(cloud_config(proxy.base_url), extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
        client = handle.client()
        for i in range(REPEATS):
            assert client.ask(f"Question {i}?", max_tokens=2).done.outcome == "fallback"
        assert len(proxy.chat_requests()) == REPEATS, "the breaker stays closed: each turn asks the cloud"
    finally:
        proxy.stop()
    said = _lines(handle.log(), "falling back to the local model")
    assert len(said) == 1, said
    assert "HTTP 400 from the endpoint" in said[0]
    assert len(handle.rows("SELECT id FROM decisions WHERE outcome = 'fallback'")) == REPEATS


def test_the_same_rejected_config_reloaded_in_a_loop_is_logged_once(daemon_factory: Any) -> None:
    """Attack finding: a config tool (or a script's loop) sending SIGHUP, or `locod reload`, again and again
    while the file stays broken logged the same ERROR each time, a line a reload. Now each reload's reply
    still says why it was rejected, and the log says it once a minute; a rejection for another reason is
    said at once."""
    handle = daemon_factory({})
    handle.config_path.write_text("[routing]\nsla = 9\n")
    client = handle.client()
    for _ in range(REPEATS):
        handle.proc.send_signal(signal.SIGHUP)
        reply = client.reload()  # answered after the loop took the signal: each is a reload of its own
        assert reply["reloaded"] is False and "routing.sla must be between 0.0 and 1.0, got 9" in reply["error"]
    handle.config_path.write_text("[routing]\nsla = 2\n")
    assert "got 2" in client.reload()["error"]
    said = _lines(handle.log(), "reload rejected")
    assert len(said) == 2, said
    assert "got 9" in said[0] and "got 2" in said[1]


def test_clients_hanging_up_during_their_prompts_are_counted_and_logged_once(daemon_factory: Any, ctx: Context) -> None:
    """Attack finding: each client that sent a long prompt and hung up while the local model read it logged
    an INFO line of its own ("a cancelled turn freed the local model ..."): a client doing it in a loop grew
    the log by a line a request. Now the first is said in full and the rest summarised, while `status`
    (`prompts_stopped`) still counts every one."""
    handle = long_context_daemon(daemon_factory)
    leavers = 4
    for i in range(leavers):
        leaver = dealer(handle, ctx)
        send(leaver, f"leaver{i}", "chat", prompt=LONG_PROMPT, options={"force": "local", "max_tokens": 8})
        assert receive(leaver)["type"] == "decision"  # accepted, its prompt being read
        leaver.close()
        wait_for(lambda: status(handle, ctx)["queue"]["in_flight"] == 0, 300, "the turn to end")
    assert status(handle, ctx)["local"]["prompts_stopped"]["turns"] == leavers
    said = _lines(handle.log(), "prompt tokens unread")
    assert len(said) == 1, said
