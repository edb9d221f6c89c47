"""Round ten of attacks on a running daemon: privacy and secrets end to end. Private material must never
reach a cloud model, and secrets (keys, a base_url's password) never what the daemon shows or says; each
test is one way in that broke, and now holds. The cloud is the loopback server behind the recording proxy."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest

from locod.daemon.openai_wire import broke_off_parts
from locod.daemon.sessions import WITHHELD
from locod.protocol import Attachment, DeltaFrame

from .conftest import SECRET, DaemonHandle, cloud_config, free_port, locod_command, wait_for, write_config
from .faultproxy import Fault, FaultProxy

KEY = {"LOCOD_CLOUD_API_KEY": SECRET}
MEMO = Attachment("document", "memo.md", data=b"The vault code is ZX-4471-QQ.", private=True)
PASSWORD = "hunter2-b4se-url"


def _post(port: int, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


QUESTION = "What is the vault code? Quote the memo."


def _private_answer_over_http(daemon_factory: Any, proxy: FaultProxy) -> tuple[DaemonHandle, dict[str, Any], int, str]:
    """A daemon with its HTTP door on (its handle, config and port), and its local answer to QUESTION, made
    from the private memo."""
    port = free_port()
    config = cloud_config(proxy.base_url, timeout_s=60.0)
    config["http"] = {"listen": f"127.0.0.1:{port}"}
    handle = daemon_factory(config, extra_env=KEY)
    first = handle.client().ask(QUESTION, attachments=[MEMO], force="local", max_tokens=16, temperature=0.0, seed=1)
    return handle, config, port, first.text


def test_a_private_answer_sent_back_with_its_whitespace_changed_is_still_withheld(
    daemon_factory: Any, proxy: FaultProxy
) -> None:
    """A client that sends its conversation back does not always send the answer byte for byte: a chat UI
    trims it, a browser's text field turns its line ends into CRLF, another adds a newline. The daemon knew
    its answers made from private material by the SHA-256 of their exact text, so any such change sent the
    private answer to the cloud in full; now it knows them by their words, whitespace aside."""
    handle, _, port, first = _private_answer_over_http(daemon_factory, proxy)
    answer = first.strip()
    assert answer
    reshaped = ("\n" + answer.replace("\n", "\r\n") + "\n", " ".join(answer.split()) + "  ")
    conversation = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": reshaped[0]}]
    conversation.append({"role": "user", "content": "Thanks. Now say hello."})
    over_http = _post(port, {"model": "cloud-small", "messages": conversation, "max_tokens": 4})
    assert over_http["locod"]["location"] == "cloud"
    conversation[1]["content"] = reshaped[1]
    over_socket = handle.client().ask(None, messages=conversation, force="cloud", max_tokens=4)  # type: ignore[arg-type]
    assert over_socket.decision.location == "cloud"
    sent = [seen.body["messages"] for seen in proxy.chat_requests()]
    assert len(sent) == 2 and all(messages[1] == {"role": "assistant", "content": WITHHELD} for messages in sent)
    assert "ZX-4471" not in json.dumps(sent) and answer not in json.dumps(sent)


def test_no_command_shows_the_password_a_base_url_carries(daemon_factory: Any, tmp_path: Path) -> None:
    """A base_url may carry user:password (a proxy gateway's basic auth). `locod status`, `config show` and
    the messages redact it; `locod models list` printed the URL as written, password and all. A base_url that
    is not http(s) was quoted whole in the config error, the daemon's log and `locod reload`'s answer."""
    url = f"http://alice:{PASSWORD}@127.0.0.1:{free_port()}/v1"  # nothing listens: no turn is needed
    handle = daemon_factory(cloud_config(url, mode="auto"), extra_env=KEY)
    for command in (("models", "list"), ("models", "list", "--json"), ("status",), ("config", "show")):
        done = handle.cli(*command)
        assert done.returncode == 0, done.stderr
        assert PASSWORD not in done.stdout + done.stderr, command
    assert "127.0.0.1" in handle.cli("models", "list").stdout  # the endpoint is still named, without it

    bad = cloud_config(f"ftp://alice:{PASSWORD}@files.example/v1")
    config = write_config(tmp_path / "bad.toml", bad)
    for command in (("config", "show"), ("models", "list")):
        args = ("--config", str(config), *command)
        done = subprocess.run(locod_command(*args), capture_output=True, text=True, env=handle.env, timeout=60)
        assert done.returncode != 0 and "base_url must be an http(s) URL" in done.stderr, done.stderr
        assert PASSWORD not in done.stdout + done.stderr
    handle.config_path.write_text(config.read_text())
    reloaded = handle.cli("reload")
    assert "base_url must be an http(s) URL" in reloaded.stdout + reloaded.stderr
    assert PASSWORD not in reloaded.stdout + reloaded.stderr and PASSWORD not in handle.log()


def test_the_part_of_a_private_answer_a_user_stopped_is_still_withheld(daemon_factory: Any, proxy: FaultProxy) -> None:
    """A chat UI keeps the part of an answer its user stopped and sends it back with the next question. The
    daemon knew a private answer by the digest of the whole text it made, which the part its client got
    never matches (the model went on a few tokens after the client left): that part went to the cloud. Now
    the answer's opening words are known too."""
    handle = daemon_factory(cloud_config(proxy.base_url, timeout_s=60.0), extra_env=KEY)
    question = "Quote the memo's vault code, then write a long story about the vault."
    received = ""
    frames = handle.client().chat(question, attachments=[MEMO], force="local", max_tokens=200, temperature=0.0)
    for frame in frames:
        received += frame.text if isinstance(frame, DeltaFrame) else ""
        if len(received.split()) >= 5:
            break  # the user presses stop: the turn is cancelled
    frames.close()
    assert len(received.split()) >= 5
    (row,) = wait_for(lambda: [r for r in handle.rows() if r["outcome"] != "pending"], 60, "the turn to end")
    assert row["outcome"] == "cancelled"
    conversation = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": received},
        {"role": "user", "content": "Thanks. Now say hello."},
    ]
    cloud = handle.client().ask(None, messages=conversation, force="cloud", max_tokens=4)  # type: ignore[arg-type]
    assert cloud.decision.location == "cloud"
    (seen,) = proxy.chat_requests()
    assert seen.body["messages"][1] == {"role": "assistant", "content": WITHHELD}
    assert received.strip() not in json.dumps(seen.body)


def test_a_private_fallback_answer_after_a_broken_cloud_stream_is_withheld_when_sent_back(
    daemon_factory: Any, proxy: FaultProxy
) -> None:
    """Over HTTP a cloud stream that breaks is followed, in the same message, by a marker and the local
    model's answer, which an OpenAI client sends back as one assistant message. Made from private material
    (here: history holding a private answer), that local answer was known by its own digest only, which the
    message as a whole never matches: once the daemon no longer held the conversation (a restart), it went
    to the cloud. Each part of such a message is now looked up on its own."""
    handle, config, port, first = _private_answer_over_http(daemon_factory, proxy)
    conversation = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "Repeat the vault code, then tell me about the sea."},
    ]
    proxy.set(Fault("cut", cut_after_chunks=3, times=1))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    asked = {"model": "cloud-small", "messages": conversation, "max_tokens": 24, "stream": True}
    chunks = list(client.chat.completions.create(**asked))  # type: ignore[call-overload]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    local_part = broke_off_parts(text)[-1]
    assert local_part.strip() and handle.rows()[-1]["outcome"] == "fallback", text
    handle.stop()
    handle = daemon_factory(config, extra_env=KEY)  # the same state: the conversation is no longer held
    conversation += [{"role": "assistant", "content": text}, {"role": "user", "content": "Thanks. Say hello."}]
    again = _post(port, {"model": "cloud-small", "messages": conversation, "max_tokens": 4})
    assert again["locod"]["location"] == "cloud"
    sent = proxy.chat_requests()[-1].body["messages"]
    assert sent[1] == sent[3] == {"role": "assistant", "content": WITHHELD}
    assert local_part.strip() not in json.dumps(sent)


@pytest.mark.parametrize(
    ("field", "refusal"),
    [("api_key_env", "api_key_env must name the environment variable"), ("api_key_file", "must be an absolute path")],
)
def test_a_key_written_where_its_name_goes_is_refused_unquoted(daemon_factory: Any, field: str, refusal: str) -> None:
    """The key itself where the name of its variable or the path of its file goes is an easy slip. It was
    taken as a name: the log warned "has no API key: set $sk-...", `locod status` listed it under
    ``no_api_key``, `config show` printed it; as a path, the start's and the reload's error quoted it. Now a
    value that is no variable's name, or a key file's path that is not absolute, is refused unquoted."""
    handle = daemon_factory()
    slipped = cloud_config("https://api.example.com/v1", mode="auto")
    slipped["cloud"]["models"][0][field] = SECRET
    write_config(handle.config_path, slipped)
    for command in (("reload",), ("models", "list"), ("config", "show")):  # show: the running configuration
        done = handle.cli(*command)
        said = done.stdout + done.stderr
        assert SECRET not in said, command
        assert refusal in said or command == ("config", "show")
    assert SECRET not in handle.log() and SECRET not in json.dumps(handle.client().status())
    started = daemon_factory(slipped, name="slipped", wait=False)
    assert started.proc.wait(60) != 0 and SECRET not in started.log() and refusal in started.log()


def test_a_redirect_is_named_without_the_password_its_location_carries(daemon_factory: Any, proxy: FaultProxy) -> None:
    """An endpoint that builds a redirect's Location from the request's URL echoes a base_url's user:password;
    the fallback's message, the log and the decision record named the redirect's host with it."""
    handle = daemon_factory(cloud_config(proxy.base_url, mode="auto", max_retries=0), extra_env=KEY)
    proxy.set(Fault("redirect", status=307, location=f"https://alice:{PASSWORD}@gateway.example:8443/v1/chat"))
    result = handle.client().ask("hello there", force="cloud", max_tokens=4)
    assert result.fallback is not None and result.fallback.cause == "cloud_redirect"
    assert "gateway.example:8443" in result.fallback.message
    said = [result.fallback.message, handle.log(), json.dumps(handle.rows()), json.dumps(handle.client().status())]
    assert not any(PASSWORD in text for text in said)
