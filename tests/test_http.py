"""The OpenAI-compatible HTTP API, driven by the real `openai` SDK against a real daemon (and, for the cloud,
the loopback llama_cpp.server behind the recording proxy); /metrics read with prometheus-client's parser."""

from __future__ import annotations

import base64
import json
import logging
import signal
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from locod.daemon.config import load_config
from locod.daemon.conversations import Conversations
from locod.daemon.openai_wire import HttpError, parse_completion, status_of
from locod.daemon.sessions import SessionStore, TurnTrail
from locod.errors import ConfigError
from locod.protocol import ErrorFrame

from .conftest import SECRET, DaemonHandle, cloud_config, free_port, wait_for
from .faultproxy import Fault, FaultProxy, image_parts

LOCAL = "smollm2-135m-instruct"
SYSTEM = {"role": "system", "content": "Be brief."}
ANSWERED = threading.Event()  # a turn that has answered: it holds its session no longer
ANSWERED.set()


def http_daemon(factory: Any, config: dict[str, Any] | None = None, **http: Any) -> tuple[DaemonHandle, str]:
    port = free_port()
    config = dict(config or {})
    config["http"] = {"listen": f"127.0.0.1:{port}", **http}
    handle = factory(config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    return handle, f"http://127.0.0.1:{port}"


def sdk(base: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def get(url: str, key: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = get(f"{base}/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_whole_and_streamed_answers_continue_one_session(daemon_factory: Any) -> None:
    handle, base = http_daemon(daemon_factory)
    client = sdk(base)
    assert [m.id for m in client.models.list()] == ["auto", LOCAL]
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8, temperature=0.0
    )
    first = raw.parse()
    assert raw.headers["x-locod-location"] == "local" and int(raw.headers["x-locod-decision"]) == 1
    answer = first.choices[0].message.content
    assert answer and first.model == LOCAL and 0 < first.usage.completion_tokens <= 8  # type: ignore[union-attr]
    locod = (first.model_extra or {})["locod"]
    assert locod["decision"] == 1 and locod["outcome"] == "ok" and locod["reason"]

    conversation = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And another one."},
    ]
    chunks = list(
        client.chat.completions.create(
            model="auto", messages=conversation, max_tokens=8, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0  # type: ignore[union-attr]
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert (chunks[-2].model_extra or {})["locod"]["outcome"] == "ok"

    rows = handle.rows()
    assert [(r["session"], r["turn"], r["outcome"]) for r in rows] == [(locod["session"], i, "ok") for i in (0, 1)]
    assert rows[1]["tokens_in"] > rows[0]["tokens_in"]  # the history was in the second prompt
    metrics = samples(base)
    assert metrics[("locod_turns_total", (("location", "local"), ("outcome", "ok")))] == 2
    assert metrics[("locod_decision_seconds_count", ())] == 2
    assert metrics[("locod_tokens_total", (("direction", "out"), ("location", "local")))] == sum(
        r["tokens_out"] for r in rows
    )
    assert ("locod_sla_target", ()) in metrics and metrics[("locod_local_queue_depth", ())] == 0
    assert metrics[("locod_turns_in_flight", ())] == 0  # both answered, as status counts them
    assert get(f"{base}/health") == (200, '{"status":"ok"}')


def png(width: int = 48, height: int = 32) -> bytes:
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2] = (0, 0, 255)
    ok, encoded = cv2.imencode(".png", image)
    assert ok
    return bytes(encoded)


def test_forced_cloud_model_gets_the_image_and_the_history_once(daemon_factory: Any, proxy: FaultProxy) -> None:
    handle, base = http_daemon(daemon_factory, cloud_config(proxy.base_url, mode="auto", timeout_s=60.0))
    client = sdk(base)
    assert {m.id for m in client.models.list()} == {"auto", LOCAL, "cloud-small"}
    first = client.chat.completions.create(
        model=LOCAL, messages=[SYSTEM, {"role": "user", "content": "My cat is called Tom."}], max_tokens=8
    )
    answer = first.choices[0].message.content or ""
    url = "data:image/png;base64," + base64.b64encode(png()).decode()
    question: list[Any] = [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": url}},
    ]
    raw = client.chat.completions.with_raw_response.create(
        model="cloud-small",
        messages=[
            SYSTEM,
            {"role": "user", "content": "My cat is called Tom."},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": question},
        ],
        max_tokens=8,
        stream=True,
    )
    assert raw.headers["x-locod-location"] == "cloud"
    assert "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    (seen,) = proxy.chat_requests()
    texts = [(m["role"], m["content"]) for m in seen.body["messages"] if isinstance(m["content"], str)]
    # the whole first turn, system message included, is held by the session and sent once
    assert texts == [("system", "Be brief."), ("user", "My cat is called Tom."), ("assistant", answer)]
    (image,) = image_parts(seen)
    assert image.startswith("data:image/jpeg;base64,")
    rows = handle.rows()
    assert rows[1]["session"] == rows[0]["session"] and rows[1]["turn"] == 1
    assert (rows[1]["backend"], rows[1]["outcome"], rows[1]["images_sent"]) == ("cloud", "ok", 1)
    assert json.loads(rows[1]["attachments_sent"]) == ["image-0"]


def test_stop_sequences_end_the_answer_before_them_on_either_side(daemon_factory: Any, proxy: FaultProxy) -> None:
    """Greedy answers with and without a stop word taken from the whole answer: the cut answer is the whole
    one up to that word, through the HTTP door and the socket, from the local model and the cloud."""
    handle, base = http_daemon(daemon_factory, cloud_config(proxy.base_url, mode="auto", timeout_s=60.0))
    client, socket_client = sdk(base), handle.client()
    question = "List five colours, separated by commas."
    ask = [{"role": "user", "content": question}]
    same = {"max_tokens": 24, "temperature": 0.0, "seed": 1}
    for model, force in ((LOCAL, "local"), ("cloud-small", "cloud")):
        whole = client.chat.completions.create(model=model, messages=ask, **same).choices[0].message.content  # type: ignore[call-overload]
        assert whole and len(whole.split()) >= 3, whole
        word = whole.split()[2]  # a stop sequence that first shows up inside the answer
        cut = client.chat.completions.create(model=model, messages=ask, stop=[word, "never said"], **same)  # type: ignore[call-overload]
        assert cut.choices[0].message.content == whole[: whole.index(word)]
        assert cut.choices[0].finish_reason == "stop"
        streamed = client.chat.completions.create(model=model, messages=ask, stop=word, stream=True, **same)  # type: ignore[call-overload]
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == whole[: whole.index(word)]
        by_socket = socket_client.ask(question, model=model, force=force, stop=word, **same)  # one string: one stop
        assert (by_socket.decision.location, by_socket.text) == (force, whole[: whole.index(word)])
        by_cli = handle.cli(
            "ask", question, "--force", force, "--max-tokens", "24", "--temperature", "0", "--seed", "1", "--stop", word
        )
        assert by_cli.stdout.rstrip("\n") == whole[: whole.index(word)].rstrip("\n"), by_cli.stderr
    assert proxy.chat_requests()[-1].body["stop"] == [word]  # the cloud was asked to stop, not cut afterwards


def test_errors_map_onto_status_codes_and_a_hang_up_cancels_the_turn(daemon_factory: Any) -> None:
    handle, base = http_daemon(daemon_factory, {"daemon": {"queue_limit": 1, "max_message_bytes": 4096}})
    client = sdk(base)
    ask = [{"role": "user", "content": "Hello"}]
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-nope", messages=ask)  # type: ignore[arg-type]
    assert missing.value.code == "model_not_found"
    remote = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]
    for body, code in (
        ({"messages": remote}, "remote_image"),
        ({"messages": ask, "stop": ["a", "b", "c", "d", "e"]}, "bad_field"),  # OpenAI's limit is 4
        ({"messages": ask, "stop": [""]}, "bad_field"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "bad_field"),
    ):
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model="auto", **body)  # type: ignore[call-overload]
        assert bad.value.code == code
    with pytest.raises(openai.APIStatusError) as large:
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "x" * 5000}])
    assert large.value.status_code == 413
    assert "limit of 4096 bytes (daemon.max_message_bytes)" in large.value.message  # the key to raise

    # greedy, a story that runs past 400 tokens: a sampled answer to "Hello" (a few dozen tokens) could end, and
    # free the slot, before the next request came
    story = [{"role": "user", "content": "Write a long story about a dragon"}]
    stream = client.chat.completions.create(model="auto", messages=story, max_tokens=1000, temperature=0, stream=True)
    next(iter(stream))  # the turn is accepted and generating: the one slot of the queue is taken
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="auto", messages=ask, max_tokens=4)
    stream.close()  # hang up mid-answer
    row = wait_for(lambda: [r for r in handle.rows() if r["outcome"] != "pending"], 60, "the turn to end")[0]
    assert row["outcome"] == "cancelled" and row["error"] == "the HTTP client disconnected"
    assert row["tokens_out"] < 1000


def test_shutdown_finishes_the_stream_then_refuses(daemon_factory: Any) -> None:
    handle, base = http_daemon(daemon_factory, {"daemon": {"shutdown_grace_s": 600.0}})  # the turn may finish
    client = sdk(base)
    stream = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "Tell a long story."}], max_tokens=300, stream=True
    )
    chunks = iter(stream)
    next(chunks)
    handle.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: get(f"{base}/health")[0] == 503, 30, "/health to say the daemon is stopping")
    with pytest.raises(openai.InternalServerError) as refused:
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert refused.value.status_code == 503 and refused.value.code == "shutting_down"
    rest = list(chunks)
    assert (rest[-1].model_extra or {})["locod"]["outcome"] == "ok"
    assert handle.proc.wait(60) == 0
    assert [r["outcome"] for r in handle.rows()] == ["ok"]


def test_bearer_key_is_required_and_checked(daemon_factory: Any, tmp_path: Path) -> None:
    key_file = tmp_path / "http.key"
    key_file.write_text("sk-http-secret-31c4\n")
    key_file.chmod(0o600)
    handle, base = http_daemon(daemon_factory, api_key_file=str(key_file))
    with pytest.raises(openai.AuthenticationError):
        sdk(base, "sk-wrong").models.list()
    assert get(f"{base}/metrics")[0] == 401
    assert [m.id for m in sdk(base, "sk-http-secret-31c4").models.list()] == ["auto", LOCAL]
    assert get(f"{base}/metrics", "sk-http-secret-31c4")[0] == 200
    assert "sk-http-secret-31c4" not in handle.log()


@pytest.mark.parametrize(
    ("http", "message"),
    [
        ({"listen": "0.0.0.0:{port}"}, "beyond loopback: set http.api_key_file"),
        ({"listen": "127.0.0.1:{port}", "api_key_file": "{loose}"}, "is readable by group or others"),
    ],
)
def test_unsafe_http_settings_refuse_to_start(
    daemon_factory: Any, tmp_path: Path, http: dict[str, str], message: str
) -> None:
    loose = tmp_path / "loose.key"
    loose.write_text("k")
    loose.chmod(0o644)
    values = {k: v.format(port=free_port(), loose=loose) for k, v in http.items()}
    handle = daemon_factory({"http": values}, wait=False)
    assert handle.proc.wait(120) != 0
    assert message in handle.log()


def test_a_port_in_use_stops_the_start(daemon_factory: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        handle = daemon_factory({"http": {"listen": f"127.0.0.1:{port}"}}, wait=False)
        assert handle.proc.wait(120) != 0
    assert f"cannot serve HTTP on 127.0.0.1:{port}: Address already in use" in handle.log()


# -- without a daemon --------------------------------------------------------------------------------


def test_http_listen_is_validated_and_read_from_the_environment(tmp_path: Path) -> None:
    env = {"LOCOD_HTTP": "127.0.0.1:8080", "HOME": str(tmp_path)}
    assert load_config(env=env).http.listen == "127.0.0.1:8080"
    assert load_config(env={}, overrides={"http.listen": "[::1]:9000"}).http.listen == "[::1]:9000"
    for bad in ("8080", "localhost:", "127.0.0.1:99999", ":80"):
        with pytest.raises(ConfigError, match=r"http\.listen must look like 127\.0\.0\.1:8080"):
            load_config(env={}, overrides={"http.listen": bad})


def test_image_parts_become_attachments_and_remote_urls_are_refused() -> None:
    url = "data:image/png;base64," + base64.b64encode(b"\x89PNG...").decode()
    parts = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": url}}]
    completion = parse_completion(
        {
            "model": "auto",
            "messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": parts}],
        },
        [LOCAL],
    )
    assert completion.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "look"}]
    assert [(a.kind, a.data) for a in completion.attachments] == [("image", b"\x89PNG...")]
    assert completion.model is None and completion.options.stream is False
    with pytest.raises(HttpError) as remote:
        parse_completion(
            {
                "model": LOCAL,
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}
                ],
            },
            [LOCAL],
        )
    assert (remote.value.status, remote.value.code) == (400, "remote_image")
    with pytest.raises(HttpError) as unknown:
        parse_completion({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, [LOCAL])
    assert (unknown.value.status, unknown.value.body()["error"]["code"]) == (404, "model_not_found")


@pytest.mark.parametrize(
    ("kind", "code", "status"),
    [
        ("bad_attachment", "attachment_too_large", 413),
        ("prompt_too_long", "prompt_too_long", 400),
        ("busy", "busy", 429),
        ("busy", "shutting_down", 503),
        ("busy", "cancelled", 503),
        ("cloud", "cloud_http", 502),
        ("unknown_model", "unknown_model", 404),  # a model a reload removed after the door's own check
        ("model", "model_missing", 404),  # its file gone or broken: not a 5xx, which the SDKs retry
        ("model", "model_corrupt", 404),
        ("error", "internal", 500),
    ],
)
def test_daemon_errors_map_onto_http_statuses(kind: str, code: str, status: int) -> None:
    assert status_of(ErrorFrame(kind, code, "why")) == status


@pytest.mark.parametrize(
    "kept", [b"not json", b'["a"]', b'{"abc": "http-1"}', b'{"' + b"a" * 64 + b'": 5}', b"\xff\xfe"]
)
def test_a_kept_conversation_map_that_is_not_one_is_ignored_with_a_line(
    kept: bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "conversations.json"
    path.write_bytes(kept)
    with caplog.at_level(logging.WARNING, logger="locod.daemon.conversations"):
        conversations = Conversations(SessionStore(idle_s=60, max_sessions=10), limit=10, kept_in=path)
    question = [{"role": "user", "content": "Hi"}]
    assert conversations.continuing(question, None, ANSWERED)[1] == question
    (line,) = [r.getMessage() for r in caplog.records]
    assert "not the HTTP conversations locod keeps" in line
    conversations.answered(question, "Hello!", "http-abc")
    conversations.save()  # written over, whole
    follow = [*question, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    again = Conversations(SessionStore(idle_s=60, max_sessions=10), limit=10, kept_in=path)
    assert again.continuing(follow, None, ANSWERED) == ("http-abc", follow)  # a session it no longer holds: all is sent


def test_a_conversation_continues_its_session_only_while_the_session_holds_its_prefix() -> None:
    store = SessionStore(idle_s=60, max_sessions=10)
    conversations = Conversations(store, limit=10)
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    fresh, sent = conversations.continuing(first, None, ANSWERED)
    assert fresh and fresh.startswith("http-") and sent == first  # its own session: one-off turns keep none
    session = store.open(fresh, "http")
    store.record(session, first, "Hello!", TurnTrail("local", (), "chat"))
    conversations.answered(first, "Hello!", session.id)
    second = [*first, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    assert conversations.continuing(second, None, ANSWERED) == (session.id, [{"role": "user", "content": "Bye"}])
    edited = [*first, {"role": "assistant", "content": "Hey"}, {"role": "user", "content": "Bye"}]
    fresh, sent = conversations.continuing(edited, None, ANSWERED)
    assert fresh and fresh.startswith("http-") and fresh != session.id and sent == edited
    # a named session: what it holds is not sent again; a client feeding it one message at a time is taken as is
    assert conversations.continuing(second, session.id, ANSWERED) == (session.id, [{"role": "user", "content": "Bye"}])
    assert conversations.continuing([{"role": "user", "content": "Bye"}], session.id, ANSWERED)[1] == [
        {"role": "user", "content": "Bye"}
    ]


def test_http_listen_without_the_http_extra_is_one_clear_error(daemon_factory: Any, tmp_path: Path) -> None:
    """A daemon installed without `locod[http]` (install.sh's core install did not have it) that is asked to
    listen says which extra to install, instead of a traceback."""
    absent = tmp_path / "absent" / "starlette"  # shadows the installed package, as if it were missing
    absent.mkdir(parents=True)
    missing = "raise ModuleNotFoundError(\"No module named 'starlette'\", name='starlette')\n"
    (absent / "__init__.py").write_text(missing)
    config = {"http": {"listen": f"127.0.0.1:{free_port()}"}}
    handle = daemon_factory(config, wait=False, extra_env={"PYTHONPATH": str(absent.parent)})
    assert handle.proc.wait(120) != 0
    log = handle.log()
    assert "needs the http extra (starlette is missing)" in log and "pip install '.[http]' in the locod checkout" in log
    assert "Traceback" not in log


def test_an_image_the_model_could_not_see_is_flagged(daemon_factory: Any) -> None:
    """The socket API's decision frame says so in `notice`; the HTTP reply in `locod.notice`, whole or
    streamed."""
    _, base = http_daemon(daemon_factory)
    url = "data:image/png;base64," + base64.b64encode(png()).decode()
    question: list[Any] = [{"type": "text", "text": "What is here?"}, {"type": "image_url", "image_url": {"url": url}}]
    messages: Any = [{"role": "user", "content": question}]
    whole = sdk(base).chat.completions.create(model=LOCAL, messages=messages, max_tokens=4)
    assert "cannot see images; not seen:" in (whole.model_extra or {})["locod"]["notice"]
    chunks = list(sdk(base).chat.completions.create(model=LOCAL, messages=messages, max_tokens=4, stream=True))
    (last,) = [c for c in chunks if (c.model_extra or {}).get("locod")]
    assert "cannot see images" in last.model_extra["locod"]["notice"]  # type: ignore[index]
    plain = sdk(base).chat.completions.create(model=LOCAL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert "notice" not in (plain.model_extra or {})["locod"]


def test_a_cloud_stream_that_breaks_is_marked_where_it_broke(daemon_factory: Any, proxy: FaultProxy) -> None:
    """An OpenAI client cannot discard the cloud's text it was already sent: the stream says where it broke
    off before the local answer follows, in the fallback's words: why, and the image the local model that
    answers instead cannot see (the marker said only that the local model answers)."""
    handle, base = http_daemon(daemon_factory, cloud_config(proxy.base_url, mode="auto", timeout_s=60.0))
    proxy.set(Fault("cut", cut_after_chunks=3, times=1))
    url = "data:image/png;base64," + base64.b64encode(png()).decode()
    question: Any = [
        {"type": "text", "text": "Tell me about the sea."},
        {"type": "image_url", "image_url": {"url": url}},
    ]
    chunks = list(
        sdk(base).chat.completions.create(
            model="cloud-small", messages=[{"role": "user", "content": question}], max_tokens=16, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    cloud_part, marker, local_part = text.partition("[the cloud's answer broke off here; the cloud answer failed (")
    assert cloud_part.strip() and marker and local_part.strip(), text
    assert "answering locally, from the start, by a model that cannot see images (not seen: " in local_part
    assert (chunks[-1].model_extra or {})["locod"]["outcome"] == "fallback"
    assert handle.rows()[0]["outcome"] == "fallback"
    # Sent back whole, the answer is the local one the session holds: the conversation stays in its session
    # (it left it, and the break-off line reached the model as history).
    conversation = [{"role": "user", "content": question}, {"role": "assistant", "content": text}]
    conversation.append({"role": "user", "content": "Thanks."})
    sdk(base).chat.completions.create(model=LOCAL, messages=conversation, max_tokens=4)
    assert len({row["session"] for row in handle.rows()}) == 1


def test_a_body_that_is_not_text_is_a_400_not_a_crash(daemon_factory: Any) -> None:
    handle, base = http_daemon(daemon_factory)
    bodies = [
        b'{"model": "auto", "messages": [{"role": "user", "content": "\\ud800"}]}',  # a lone surrogate
        b'{"model": "auto", "model": "x", "messages": []}',  # a key twice
    ]
    for body in bodies:
        request = urllib.request.Request(f"{base}/v1/chat/completions", data=body, method="POST")
        request.add_header("content-type", "application/json")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=60)
        assert info.value.code == 400, body
    assert handle.rows() == []
    assert "Traceback" not in handle.log()


def test_a_chat_uis_conversation_resumes_from_its_parked_state_after_a_restart(daemon_factory: Any) -> None:
    """A chat UI names no session: the daemon maps its conversation onto one, and with `local.cache_disk_mb`
    the session's dialogue state is parked at the stop. The map was lost with the process, so after a restart
    the conversation got a new session and read its whole history again; the map is kept beside the log now,
    and only while states are parked."""
    config: dict[str, Any] = {"routing": {"mode": "local"}, "local": {"cache_disk_mb": 64}}
    handle, base = http_daemon(daemon_factory, config)
    conversation: Any = [{"role": "user", "content": "Tell me about the sea."}]
    first = sdk(base).chat.completions.create(model="auto", messages=conversation, max_tokens=8, temperature=0)
    conversation += [{"role": "assistant", "content": first.choices[0].message.content}]
    conversation += [{"role": "user", "content": "And about mountains?"}]
    handle.stop()
    handle, base = http_daemon(daemon_factory, config)  # the same state directory
    sdk(base).chat.completions.create(model="auto", messages=conversation, max_tokens=8, temperature=0)
    sessions = [row["session"] for row in handle.rows()]
    assert len(sessions) == 2 and len(set(sessions)) == 1, sessions  # one session across the restart
    assert handle.client().status()["local"]["cache"]["disk_hits"] == 1  # resumed from its parked state
