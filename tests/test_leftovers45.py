"""Leftovers 45: what users still met. Refusals on both doors that quoted a value as Python writes it; a
removed pulled model said "file not found" with a path to fix; the HTTP door's 404 for an absolute-form
request line and its pass for two Origins; a CLI flag given twice. Real daemon, real sockets, real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from locod.daemon.catalog import removed_models
from locod.errors import LocodError

from .conftest import REPO, Context, DaemonHandle, locod_command, start_daemon
from .fileserver import FileServer, Served, gguf_bytes
from .test_http import http_daemon
from .test_httpattack43 import exchange
from .test_walk43 import Raw

ASKED = [{"role": "user", "content": "hi"}]

# (the socket's options, the HTTP body's fields, what both refusals say of the value)
BOTH_DOORS: list[tuple[dict[str, Any], str]] = [
    ({"temperature": True}, "must be a number between 0 and 2, got true"),
    ({"top_p": "0.5"}, 'must be a number between 0 and 1, got "0.5"'),
    ({"max_tokens": 2.5}, "must be an integer between 1 and 1048576, got 2.5"),
    ({"seed": [1]}, "got an array"),
    ({"stop": {"at": "."}}, "must be an array of non-empty strings, got an object"),
    ({"stop": ["end", 7]}, "must be an array of non-empty strings; its item 1 is 7"),
    ({"response_format": "json"}, 'or {"type": "text"}, got "json"'),
    ({"response_format": {"type": "xml"}}, 'or {"type": "text"}, got an object with "type": "xml"'),
    ({"response_format": {"type": "json_object", "schema": {}}}, 'of type "json_object" has keys'),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
        'as OpenAI\'s API does), got "a b"',
    ),
    ({"response_format": {"type": "json_schema", "json_schema": None}}, '"schema": {...}}, got null'),
]
HTTP_ONLY: list[tuple[dict[str, Any], str]] = [
    ({"n": True}, "'n' must be 1, got true"),
    ({"stream": "yes"}, "'stream' must be true or false, got \"yes\""),
    ({"stream_options": "usage"}, "'stream_options' must be an object or null, got \"usage\""),
    ({"stream_options": {"usage": True}}, 'a key locod does not read, "usage"'),
    ({"stream_options": {"include_usage": "false"}}, 'must be true or false, got "false"'),
    ({"messages": [{"role": "tool", "content": "x"}, *ASKED]}, 'role "tool" is not supported'),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 'a part of type "input_audio"'),
]


def post(base: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    sent = urllib.request.Request(
        f"{base}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(sent, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_refused_value_is_said_in_json_words_at_both_doors(ctx: Context, daemon_factory: Any) -> None:
    """Finding: walk43 made the protocol's type refusals speak JSON, but option ranges, ``stop`` and
    ``response_format`` (both doors share their rules), ``n``, ``stream``, ``stream_options``, a message's
    role and a part's type (the HTTP door) still quoted the value as Python writes it: ``got True``,
    ``got '0.5'``, ``got {'type': 'xml'}``, ``role 'tool'``. A client in Go or JavaScript sent none of that.
    Each refusal now names the field and says the value as JSON does (``true``, ``"0.5"``, an array or
    object by its type)."""
    handle, base = http_daemon(daemon_factory)
    raw = Raw(ctx, handle.endpoint)
    for options, said in BOTH_DOORS:
        (name,) = options
        socket_refusal = raw.ask("chat", prompt="hi", options=options)
        assert (socket_refusal["code"], socket_refusal["kind"]) == ("bad_field", "protocol"), socket_refusal
        assert socket_refusal["message"].startswith(f"field 'options.{name}' "), socket_refusal
        status, answer = post(base, {"model": "auto", "messages": ASKED, **options})
        assert status == 400 and answer["error"]["param"] == name, answer
        assert answer["error"]["message"].startswith(f"'{name}' "), answer
        assert said in socket_refusal["message"] and said in answer["error"]["message"], (socket_refusal, answer)
    for fields, said in HTTP_ONLY:
        status, answer = post(base, {"model": "auto", "messages": ASKED, **fields})
        assert status == 400 and said in answer["error"]["message"], answer
    assert handle.rows() == []  # every one refused before a turn


def test_the_http_door_serves_an_absolute_form_request_line_and_refuses_two_origins(daemon_factory: Any) -> None:
    """Finding: ``GET http://127.0.0.1:PORT/v1/models HTTP/1.1`` (absolute-form, which RFC 9112, 3.2.2, says a
    server must accept) was answered 404, the whole URL taken for a path. It is now served as its path, the
    URL's authority standing for the Host (so on loopback a URL naming another host is refused as a foreign
    Host is), and a target that is neither a path nor an http URL is refused by name. And a request with two
    Origin headers passed the gate on the first while the CORS answer read the last: now 400, named."""
    handle, base = http_daemon(daemon_factory)
    port = int(base.rsplit(":", 1)[1])
    here = f"127.0.0.1:{port}".encode()

    def asked(line: bytes, *headers: bytes) -> tuple[bytes, dict[str, Any]]:
        head, _, body = exchange(port, b"\r\n".join([line, *headers, b"Connection: close", b"", b""])).partition(
            b"\r\n\r\n"
        )
        return head.split(b"\r\n", 1)[0], json.loads(body)

    status, listed = asked(b"GET http://" + here + b"/v1/models HTTP/1.1", b"Host: " + here)
    assert status == b"HTTP/1.1 200 OK" and "auto" in [m["id"] for m in listed["data"]], listed
    status, health = asked(b"GET HTTP://" + here + b"/health?probe=1 HTTP/1.1", b"Host: elsewhere.example")
    assert status == b"HTTP/1.1 200 OK" and health == {"status": "ok"}  # the URL's authority, not the Host
    status, foreign = asked(b"GET http://attacker.example/v1/models HTTP/1.1", b"Host: " + here)
    assert status.startswith(b"HTTP/1.1 403") and foreign["error"]["code"] == "host_not_allowed", foreign
    assert '"attacker.example"' in foreign["error"]["message"]
    status, star = asked(b"OPTIONS * HTTP/1.1", b"Host: " + here)
    assert status.startswith(b"HTTP/1.1 400") and star["error"]["code"] == "bad_request", star
    assert "nor an http URL (absolute-form)" in star["error"]["message"]

    page = b"Origin: http://" + here
    status, one = asked(b"GET /v1/models HTTP/1.1", b"Host: " + here, page)
    assert status == b"HTTP/1.1 200 OK", one
    status, two = asked(b"GET /v1/models HTTP/1.1", b"Host: " + here, page, b"Origin: http://attacker.example")
    assert status.startswith(b"HTTP/1.1 400") and two["error"]["code"] == "bad_request", two
    assert "the request names Origin 2 times" in two["error"]["message"]
    assert handle.rows() == []


@pytest.fixture
def files() -> Iterator[FileServer]:
    server = FileServer().start()
    yield server
    server.stop()


def test_a_removed_pulled_model_is_said_removed_with_how_to_pull_it_again(
    tmp_path: Path, files: FileServer, model_path: Path
) -> None:
    """Finding: a request naming a model ``locod models pull`` had brought and ``locod models rm`` since
    removed (or whose file was deleted by hand) was told, until the daemon reloaded, "file ... not found; fix
    its path in the config, or download it with `locod models pull`": a path the user never wrote, and no
    word of where the model came from. The manifest now remembers what ``rm`` removed, and the refusal says
    at once that the model was removed (or its file deleted) and the command that pulls it again."""
    files.files["tiny.gguf"] = Served(gguf_bytes(1 << 20, context_length=1024, file_type=7))
    url = f"{files.url}/files/tiny.gguf"
    own = tmp_path / "models"
    own.mkdir()
    os.link(model_path, own / model_path.name)  # the embedded default the daemon starts with
    daemon = start_daemon(tmp_path / "home", own)
    try:
        for name in ("tiny", "kept"):
            pulled = daemon.cli("models", "pull", url, "--name", name)
            assert pulled.returncode == 0, pulled.stderr
        client = daemon.client()
        assert client.reload()["reloaded"] is True
        removed = daemon.cli("models", "rm", "tiny")
        assert removed.returncode == 0, removed.stderr
        with pytest.raises(LocodError) as refused:
            client.ask("Hi", model="tiny", max_tokens=2)
        assert refused.value.code == "model_missing"
        assert refused.value.message == (
            f"model 'tiny': it was removed (`locod models rm tiny`); pull it again: `locod models pull {url} "
            "--name tiny`"
        )
        (own / "kept.gguf").unlink()  # the other's file deleted by hand
        with pytest.raises(LocodError) as deleted:
            client.ask("Hi", model="kept", max_tokens=2)
        assert deleted.value.message == (
            f"model 'kept': its file was deleted; pull it again: `locod models pull {url} --name kept`"
        )
        again = daemon.cli("models", "pull", url, "--name", "tiny")
        assert again.returncode == 0, again.stderr
        assert removed_models(own) == []  # pulled again: no longer said removed
    finally:
        daemon.stop()


def test_a_flag_given_twice_is_refused_by_name(tmp_path: Path) -> None:
    """Finding: ``locod ask --model a --model b`` asked model b without a word (argparse keeps the last): a
    command line built from pieces (an alias, a script's defaults and the user's own flag) ran other than
    its author read it. A flag that holds one value is now refused when given twice, naming it (exit 2, a
    usage error); repeatable flags (``--set``, ``--stop``, ``--attach``) and switches repeat as before."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCOD_")}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "none"), LOCOD_RUNTIME_DIR=str(tmp_path / "run"))

    def locod(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(locod_command(*args), capture_output=True, text=True, env=env, timeout=60)

    for args, flag in (
        (["ask", "--model", "a", "--model", "b", "hi"], "--model"),
        (["ask", "--force", "local", "hi", "--force", "cloud"], "--force"),
        (["--config", "a.toml", "--config", "b.toml", "status"], "--config"),
        (["decisions", "--limit", "5", "--limit", "6"], "--limit"),
    ):
        refused = locod(*args)
        assert refused.returncode == 2, refused
        assert refused.stderr.splitlines()[-1].endswith(f"error: argument {flag}: given twice: give it once")
    shown = locod("--set", "local.max_tokens=5", "config", "show", "--json", "--json", "--set", "local.max_tokens=7")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["local"]["max_tokens"] == 7


def test_the_report_and_its_picture_in_the_docs_say_feedback(daemon: DaemonHandle) -> None:
    """Finding: docs/img/report.png, the picture routing.md shows of `locod report`, labelled the labels of
    `locod feedback` "user" (the log's word) under "satisfaction labels collected", while the command, status
    and the doc say "feedback" and "labels collected": it was drawn before the report took their words. The
    picture is drawn again by scripts/report_demo.py (from the BIG-bench trace in the repo); here the words
    of a report drawn from a real turn a user labelled with `locod feedback`."""
    pytest.importorskip("matplotlib")
    from locod.daemon.history import parse_since, read_history
    from locod.report import figure

    decision = daemon.client().ask("Say hi.", force="local", max_tokens=2).done.decision
    labelled = daemon.cli("feedback", str(decision), "good")
    assert labelled.returncode == 0, labelled.stderr
    fig = figure(read_history(daemon.db_path, parse_since("1h")), 0.0, "t")
    labels_panel = next(ax for ax in fig.axes if ax.get_title() == "labels collected")
    assert [text.get_text() for text in labels_panel.get_legend().get_texts()] == ["feedback"]
    doc = " ".join((REPO / "docs" / "routing.md").read_text().split())
    assert "the labels collected are the 60 *feedback* labels" in doc
