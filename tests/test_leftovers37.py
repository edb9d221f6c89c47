"""Small defects earlier sessions noted and left (leftovers 37): the HTTP door's refusal of an unknown model
in the socket's words, an ``x-request-id`` on every HTTP reply, a JSON error on stdout for every ``--json``
command, ``stop --timeout`` bounded, ``$LOCOD_CONFIG`` named as the other variables are, the confidence of
an answer in any script, ``--max-size`` read in linear time, history trimmed in linear time, and an earlier
message's images left undecoded. Real daemons (the embedded model), the real `locod` command, real HTTP."""

from __future__ import annotations

import base64
import json
import os
import random
import socket
import string
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from llama_cpp import Llama

from locod.daemon.fitting import PER_MESSAGE_TOKENS, TEMPLATE_SLACK_TOKENS, _from_a_user, _split, trim_to_context
from locod.daemon.openai_wire import HttpError, parse_completion
from locod.daemon.pull import parse_size
from locod.errors import FetchError, PromptTooLong
from locod.policy.confidence import Answer, content_logprobs, features

from .conftest import DaemonHandle, locod_command
from .test_http import LOCAL, http_daemon

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the embedded model's file
HI = [{"role": "user", "content": "Hi"}]


def post(base: str, body: Any, raw: bytes | None = None) -> tuple[int, dict[str, str], dict[str, Any]]:
    """A chat completion as any HTTP client sends it: its status, headers and JSON body."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(f"{base}/v1/chat/completions", data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def get(url: str) -> tuple[int, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers)


# -- 1. the HTTP door refuses an unknown model in the socket's words ---------------------------------------


@pytest.mark.parametrize(
    ("typed", "meant"),
    [
        (GGUF, f"; {GGUF!r} is the GGUF file of local model {LOCAL!r}: name {LOCAL!r}"),
        ("SmolLM2-135M-Instruct.Q4_1", f"is the GGUF file of local model {LOCAL!r}: name {LOCAL!r}"),
        (LOCAL.upper(), f"; names are case-sensitive: {LOCAL!r}"),
        ("gpt-4o-mini", "; 'gpt-4o-mini' is the endpoint's model id of cloud model 'gpt-mini': name 'gpt-mini'"),
        ("/nowhere/other.gguf", "; a GGUF file is not a model's name: name it in the config"),
    ],
)
def test_the_http_door_says_what_an_unknown_model_was_meant_as_the_socket_does(
    daemon_factory: Any, typed: str, meant: str
) -> None:
    """`locod ask --model SmolLM2-135M-Instruct.Q4_1.gguf` was told the name of the model whose file it is;
    the HTTP door said only that "the model does not exist" (and a case slip nothing either). Both now add
    the same words, from one function, to a chat's refusal and to ``GET /v1/models/{id}``'s."""
    cloud = {"name": "gpt-mini", "base_url": "http://127.0.0.1:9/v1", "model": "gpt-4o-mini"}
    handle, base = http_daemon(daemon_factory, {"routing": {"mode": "local"}, "cloud": {"models": [cloud]}})
    asked = handle.cli("ask", "--model", typed, "hi")
    assert asked.returncode == 1 and meant in asked.stderr, asked.stderr
    status, _, body = post(base, {"model": typed, "messages": HI})
    message = body["error"]["message"]
    assert (status, body["error"]["code"]) == (404, "model_not_found")
    assert message.startswith(f"the model {typed!r} does not exist; send 'auto' or one of {LOCAL!r}, 'gpt-mini'")
    assert meant in message and message.endswith("; see GET /v1/models"), message
    if not typed.startswith("/"):  # a path's slashes are the URL's own
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{base}/v1/models/{typed}", timeout=30)
        assert json.loads(missing.value.read())["error"]["message"] == message
    assert handle.rows() == []


# -- 2. every HTTP reply carries an x-request-id ----------------------------------------------------------


def test_every_http_reply_carries_a_request_id(daemon_factory: Any) -> None:
    """The SDKs keep ``x-request-id`` as an error's ``request_id``: a turn that failed after its decision
    carried one, a refusal before it none (a bad body, an unknown model, an attachment that is no image,
    a path not served). Every reply now has one: a turn's is its completion's id, any other its own."""
    _, base = http_daemon(daemon_factory, {"routing": {"mode": "local"}})
    not_an_image = "data:image/png;base64," + base64.b64encode(b"plain text, no image").decode()
    shown = [{"role": "user", "content": [{"type": "text", "text": "look"}, image_part(not_an_image)]}]
    refusals = {
        "bad_json": post(base, None, raw=b"{not json"),
        "unknown_model": post(base, {"model": "nope", "messages": HI}),
        "no_messages": post(base, {"model": "auto", "messages": []}),
        "not_an_image": post(base, {"model": "auto", "messages": shown}),
    }
    ids = set()
    for what, (status, headers, body) in refusals.items():
        assert status >= 400 and "error" in body, (what, status, body)
        assert headers.get("x-request-id", "").startswith(("req-", "chatcmpl-")), (what, headers)
        ids.add(headers["x-request-id"])
    assert len(ids) == len(refusals)  # one for each reply
    handed_in = refusals["not_an_image"][1]["x-request-id"]
    assert handed_in.startswith("chatcmpl-"), handed_in  # a turn refused before its decision: the turn's id
    for url in (f"{base}/v1/models", f"{base}/health", f"{base}/v1/nowhere", f"{base}/metrics"):
        status, headers = get(url)
        assert headers.get("x-request-id", "").startswith("req-"), (url, status, headers)
    status, headers, body = post(base, {"model": "auto", "messages": HI, "max_tokens": 2})
    assert status == 200 and headers["x-request-id"] == body["id"], headers  # a turn's: its completion's id
    assert malformed_reply_headers(base).get("x-request-id", "").startswith("req-")


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def malformed_reply_headers(base: str) -> dict[str, str]:
    """The headers of the door's answer to bytes that are no HTTP/1.1 request."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        raw.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        reply = b""
        while b"\r\n\r\n" not in reply and (piece := raw.recv(4096)):
            reply += piece
    head = reply.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    assert head[0].startswith("HTTP/1.1 400"), head
    return {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}


# -- 3. every --json command fails with a JSON object on stdout -------------------------------------------


def new_user(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real `locod` with no config file and no daemon."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LOCOD_")}
    clean.update(HOME=str(home), XDG_CONFIG_HOME=str(home / "config"), LOCOD_RUNTIME_DIR=str(home / "run"))
    clean.update(XDG_STATE_HOME=str(home / "state"), **(env or {}))
    return subprocess.run(locod_command(*args), capture_output=True, text=True, env=clean, timeout=120, cwd=home)


def test_a_json_command_that_fails_says_why_on_stdout(tmp_path: Path) -> None:
    """`locod status --json` with no daemon printed nothing on stdout: a script piping it to ``jq`` read
    empty input. Every ``--json`` command now prints the ``error`` object ``ask --json`` ends with (its
    stable code from locod.errors), the exit status and the line on stderr as before."""
    for args, env, code, status in (
        (("status", "--json"), {}, "not_running", 5),
        (("config", "show", "--json"), {"LOCOD_SLA": "lots"}, "config", 2),
        (("models", "list", "--json"), {"LOCOD_CONFIG": str(tmp_path / "none.toml")}, "config", 2),
        (("decisions", "7", "--json"), {}, "unknown_decision", 1),
    ):
        result = new_user(tmp_path, *args, env=env)
        assert result.returncode == status, (args, result.stderr)
        error = json.loads(result.stdout)
        assert error["type"] == "error" and error["code"] == code, (args, error)
        assert result.stderr.strip().splitlines()[-1] == f"locod: {error['message']}"
    plain = new_user(tmp_path, "status")
    assert plain.returncode == 5 and plain.stdout == ""  # without --json, stdout stays empty


def test_ask_json_still_ends_with_one_error_line(daemon: DaemonHandle) -> None:
    """``ask --json`` printed its error frame itself; the command line prints it now, once."""
    asked = daemon.cli("ask", "--json", "--model", "nope", "hi")
    lines = asked.stdout.splitlines()
    assert asked.returncode == 1 and len(lines) == 1, asked.stdout
    assert json.loads(lines[0])["code"] == "unknown_model"


# -- 4. stop --timeout -----------------------------------------------------------------------------------


@pytest.mark.parametrize("timeout", ["inf", "1e400", "1e300", "86401", "nan", "-1", "-inf"])
def test_stop_refuses_a_timeout_it_cannot_keep(tmp_path: Path, timeout: str) -> None:
    """``--timeout inf`` (and 1e300) waited for good on a daemon that never exits; nan and negatives were
    already refused. All are now a usage error (exit 2) saying the range, before any daemon is asked."""
    result = new_user(tmp_path, "stop", f"--timeout={timeout}")
    assert result.returncode == 2, result.stderr
    assert f"argument --timeout: must be 0 or more seconds, at most 86400 (a day), got {timeout!r}" in result.stderr


# -- 5. $LOCOD_CONFIG ------------------------------------------------------------------------------------


def test_the_config_variable_is_named_as_the_others_are(tmp_path: Path) -> None:
    """An override's error names its variable as ``$LOCOD_SLA``; a missing config file said ``LOCOD_CONFIG``."""
    missing = new_user(tmp_path, "config", "show", "--new", env={"LOCOD_CONFIG": str(tmp_path / "none.toml")})
    assert missing.returncode == 2 and f"$LOCOD_CONFIG names {tmp_path / 'none.toml'}," in missing.stderr
    other = new_user(tmp_path, "config", "show", "--new", env={"LOCOD_SLA": "lots"})
    assert other.returncode == 2 and "$LOCOD_SLA" in other.stderr, other.stderr


# -- 6. the confidence of an answer in any script ---------------------------------------------------------

# One question and answer in four languages, token by token, with the same log-probabilities: each answer
# repeats the question's words but one, the capital's name, whose token the model was unsure of.
CAPITALS = {
    "English": ("What is the capital of France?", ["The", " capital", " of", " France", " is", " Paris", "."]),
    "Russian": ("Какая столица у Франции?", ["Столица", " у", " Франции", " —", " ", " Париж", "."]),
    "Greek": (
        "Ποια είναι η πρωτεύουσα της Γαλλίας;",
        ["Η", " πρωτεύουσα", " της", " Γαλλίας", " είναι", " Παρίσι", "."],
    ),
    "Chinese": ("法国的首都是什么？", ["法国", "的", "首都", "是", "：", "巴黎", "。"]),
}
SURE = [-0.1, -0.2, -0.3, -0.2, -0.1, -3.0, -0.05]


@pytest.mark.parametrize("language", ["Russian", "Greek", "Chinese"])
def test_an_answer_in_another_script_is_judged_as_an_english_one(language: str) -> None:
    """A word was ``[a-z0-9]+``: a Russian, Greek or Chinese answer had no content words, so its content
    features fell back to the whole answer's, and the one name it guessed among sure repetitions of the
    question weighed no more than they did. Now words are any script's (a Han character each)."""
    english = Answer(CAPITALS["English"][0], CAPITALS["English"][1], SURE)
    other = Answer(*CAPITALS[language], SURE)
    assert content_logprobs(english) == content_logprobs(other) == [-3.0]
    assert features(other, 16) == features(english, 16)


# -- 7. --max-size in linear time ------------------------------------------------------------------------


def test_a_long_max_size_is_refused_at_once() -> None:
    """A pattern with ``\\s*`` on both sides of an optional unit tried every split of a run of spaces: a
    megabyte of them took hours to refuse. 400 digits ended in OverflowError's traceback."""
    with pytest.raises(FetchError, match="expects a size such as 8G"):
        parse_size("1" + " " * 1_000_000 + "x")
    with pytest.raises(FetchError, match="more than any disk holds"):
        parse_size("9" * 400)
    assert parse_size("  80 GiB ") == 80 << 30 and parse_size("1.5k") == 1536


def test_pull_says_a_size_past_any_disk_as_a_usage_error(tmp_path: Path) -> None:
    result = new_user(tmp_path, "models", "pull", "--max-size", "9" * 400, "http://127.0.0.1:9/x.gguf")
    assert result.returncode == 2 and "more than any disk holds" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# -- 8. history trimmed in linear time, keeping what it kept ----------------------------------------------


@pytest.fixture(scope="module")
def vocab(model_path: Path) -> Llama:
    """The embedded model's tokenizer alone (no weights)."""
    return Llama(str(model_path), vocab_only=True, n_ctx=256, verbose=False)


def trimmed_as_before(llm: Llama, messages: list[dict[str, str]], max_tokens: int) -> list[dict[str, str]]:
    """The messages the trimming kept before it was made linear (``kept.insert(0, ...)``), the rest of its
    rule as it is; the sizes here are all far under what it refuses unread."""
    system, history, last = _split(messages)
    n_ctx = llm.n_ctx()

    def cost(message: dict[str, str]) -> int:
        return len(llm.tokenize(message["content"].encode(), add_bos=False, special=False)) + PER_MESSAGE_TOKENS

    fixed = TEMPLATE_SLACK_TOKENS + sum(cost(m) for m in system) + cost(last)
    room = n_ctx - fixed - min(max_tokens, n_ctx - fixed)
    kept: list[dict[str, str]] = []
    for message in reversed(history):
        room -= cost(message)
        if room < 0:
            break
        kept.insert(0, message)
    return _from_a_user(system, kept, last)


def random_dialogue(rng: random.Random) -> list[dict[str, str]]:
    roles = ["system"] * rng.randint(0, 2) + [rng.choice(["user", "assistant"]) for _ in range(rng.randint(0, 30))]
    words = [" ".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 12))) for _ in roles]
    return [*({"role": r, "content": w} for r, w in zip(roles, words)), {"role": "user", "content": "and now?"}]


def test_trimming_keeps_what_it_kept(vocab: Llama) -> None:
    """Each kept message was put at the front of the list, moving all the others: quadratic on a long
    history. Now it is appended and the list turned once; on 300 random dialogues (system messages,
    histories that start with an answer, budgets that drop some, all or none) it keeps the same messages."""
    rng = random.Random(37)
    trimmed = 0
    for _ in range(300):
        messages, max_tokens = random_dialogue(rng), rng.choice([16, 64, 128])
        try:
            kept = trim_to_context(vocab, messages, max_tokens)[0]
        except PromptTooLong:
            continue
        assert kept == trimmed_as_before(vocab, messages, max_tokens)
        trimmed += len(kept) < len(messages)
    assert trimmed > 50  # the budgets dropped history often


# -- 9. an earlier message's images are not decoded ------------------------------------------------------


def test_an_earlier_message_s_broken_image_does_not_refuse_the_turn(daemon_factory: Any) -> None:
    """Only the last message's images are sent, yet every message's were decoded: a chat UI sends each image
    of the conversation back with every turn, so one broken (or remote) image refused every later turn
    with 400, and each turn decoded them all. Now only the last message's are read."""
    earlier = [
        {"role": "user", "content": [{"type": "text", "text": "look"}, image_part("data:image/png;base64,@@@")]},
        {"role": "assistant", "content": "I cannot read that image."},
        {"role": "user", "content": [{"type": "text", "text": "and this?"}, image_part("https://x.example/y.png")]},
        {"role": "assistant", "content": "I fetch nothing."},
    ]
    ask = [*earlier, {"role": "user", "content": "Say hello."}]
    assert parse_completion({"model": "auto", "messages": ask}, [LOCAL]).attachments == []
    with pytest.raises(HttpError) as broken:  # the turn's own image is read, and refused when broken
        parse_completion({"model": "auto", "messages": earlier[:1]}, [LOCAL])
    assert (broken.value.code, broken.value.param) == ("bad_image", "messages[0].content[1]")
    _, base = http_daemon(daemon_factory, {"routing": {"mode": "local"}})
    status, _, body = post(base, {"model": "auto", "messages": ask, "max_tokens": 4})
    assert status == 200 and body["locod"]["attachments_sent"] == [], body
