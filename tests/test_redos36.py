"""The work one message costs, continued (docs/reliability.md): the regular expressions and loops that read
a client's or a cloud's text, hunted for work growing faster than the text. Two were: the check whether a
cloud's 500 is llama-cpp-python refusing the response format, and the check of a schema's pattern
repetitions. Real daemon, real model, real ZeroMQ, the fault proxy's 500; no wall-clock bound: a client's
timeout only tells an answer from a daemon held for many minutes."""

from __future__ import annotations

import threading
from typing import Any

from .conftest import SECRET, Context, DaemonHandle, cloud_config, wait_for
from .faultproxy import Fault, FaultProxy
from .test_attacks14 import dealer, receive, send

# Before the fix: about half an hour on this VM of one regular expression's search, which holds the
# interpreter's lock throughout, its work growing as the 500's size squared.
VALIDATION_ERRORS = "1 validation error: 'loc': ('body', 'messages') " * 20_000  # about 1 MB, within max_answer_bytes
PATTERNS = 20_000  # a schema of 20 MB, each pattern 1,000 characters: over seven minutes of checking before


def _cloud_daemon(daemon_factory: Any, proxy: FaultProxy) -> DaemonHandle:
    """A daemon whose cloud turns meet the proxy's 500 once, then fall back to the local model."""
    config = cloud_config(proxy.base_url, timeout_s=60.0, max_retries=0)
    return daemon_factory(config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})  # type: ignore[no-any-return]


def test_a_cloud_500_repeating_validation_error_is_read_while_others_are_served(
    daemon_factory: Any, proxy: FaultProxy, ctx: Context
) -> None:
    """Attack finding: a cloud 500 answering a turn with a response format is read for llama-cpp-python's
    validation error naming the field (the request's fault, not the endpoint's), by one expression that
    was tried anew from each "validation error" to the message's end: a 500 of 1 MB repeating the words
    (a cloud, or anything between it and the daemon) held every client of every door for half an hour.
    Now the field is looked for after the words' first use: a bystander's ping is answered, and the turn
    ends as any other 500 does."""
    handle = _cloud_daemon(daemon_factory, proxy)
    proxy.set(Fault(kind="status", status=500, message=VALIDATION_ERRORS))
    ended: list[Any] = []
    hostile = threading.Thread(
        target=lambda: ended.append(
            handle.client(turn_timeout_s=300).ask("Say hi.", max_tokens=8, response_format={"type": "json_object"})
        )
    )
    hostile.start()
    wait_for(lambda: proxy.chat_requests(), 60, "the turn's request at the cloud")
    bystander = dealer(handle, ctx)
    send(bystander, "after", "ping")
    assert receive(bystander)["id"] == "after"
    hostile.join(300)
    assert ended, "the turn was not over in 300 s"
    assert ended[0].fallback is not None and "response_format" not in ended[0].fallback.message


def test_llama_cpp_pythons_500_naming_the_format_after_its_validation_error_is_still_a_refusal(
    daemon_factory: Any, proxy: FaultProxy
) -> None:
    """What the check is for, unchanged: llama-cpp-python's 500 naming the field after "validation error"
    (said twice before it) says the endpoint may not take the response format."""
    handle = _cloud_daemon(daemon_factory, proxy)
    said = "validation errors; 1 validation error:\n  {'type': 'literal_error', 'loc': ('body', 'response_format')}"
    proxy.set(Fault(kind="status", status=500, message=said))
    result = handle.client(turn_timeout_s=300).ask("Say hi.", max_tokens=8, response_format={"type": "json_object"})
    assert result.fallback is not None and "may not take this response_format" in result.fallback.message


def _schema_of_many_patterns() -> dict[str, Any]:
    """Properties whose patterns open a repetition with "{" and never close it: each is the 1,000
    characters a pattern may have, of spaces after the "{"."""
    pattern = {"type": "string", "pattern": "{" + " " * 998 + "x"}
    return {"type": "object", "properties": {f"p{i}": pattern for i in range(PATTERNS)}}


def test_a_schema_of_many_long_patterns_is_refused_while_others_are_served(daemon: DaemonHandle, ctx: Context) -> None:
    """Attack finding: every pattern of a schema is checked for repetitions over the local model's bound
    before its grammar is built, by an expression that tried each split of the spaces after a "{" between
    the two places spaces may stand: about 20 ms a pattern here, and a schema of many (20 MB, within
    daemon.max_message_bytes) kept the turn, and a core, busy for over seven minutes. Now a pattern costs
    what reading it does: the schema is refused (its grammar would be too large) and a bystander's ping is
    answered."""
    hostile = dealer(daemon, ctx)
    schema = {"type": "json_schema", "json_schema": {"name": "s", "schema": _schema_of_many_patterns()}}
    send(hostile, "schema", "chat", prompt="Say hi.", options={"force": "local", "response_format": schema})
    bystander = dealer(daemon, ctx)
    send(bystander, "after", "ping")
    assert receive(bystander)["id"] == "after"
    frames = [receive(hostile)]
    while frames[-1]["type"] not in ("error", "done"):
        frames.append(receive(hostile))
    assert (frames[-1]["type"], frames[-1]["code"]) == ("error", "bad_field")
