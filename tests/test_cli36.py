"""The `locod` command line as a new user meets it: a `--model` named as the provider's docs or the GGUF
file spell it, a prompt typed without quotes, and what `decisions` says of filters that match nothing.
Real daemons (the embedded model), the real `locod` command; the cloud model is configured, never called."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .conftest import DaemonHandle, locod_command

CLOUD = {"name": "gpt-mini", "base_url": "http://127.0.0.1:9/v1", "model": "gpt-4o-mini"}
LOCAL = "smollm2-135m-instruct"  # the embedded model's name


@pytest.fixture
def with_cloud(daemon_factory: Any) -> DaemonHandle:
    """A daemon with one cloud model whose endpoint id differs from its name; turns stay local."""
    return daemon_factory({"routing": {"mode": "local"}, "cloud": {"models": [CLOUD]}})  # type: ignore[no-any-return]


def _refusal(daemon: DaemonHandle, command: str, model: str) -> str:
    """The one line `command --model model` is refused with (exit 1), before any turn is recorded."""
    args = ("ask", "--model", model, "hi") if command == "ask" else ("chat", "--model", model)
    result = daemon.cli(*args, stdin="hi\n")
    assert result.returncode == 1, result.stderr
    assert result.stdout == "", result.stdout  # chat answered no question
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("typed", "meant"),
    [
        ("gpt-4o-mini", "is the endpoint's model id of cloud model 'gpt-mini': name 'gpt-mini'"),
        ("SmolLM2-135M-Instruct.Q4_1", f"is the GGUF file of local model {LOCAL!r}: name {LOCAL!r}"),
        ("SmolLM2-135M-Instruct.Q4_1.gguf", f"is the GGUF file of local model {LOCAL!r}: name {LOCAL!r}"),
    ],
)
def test_ask_and_chat_refuse_a_model_name_alike_with_the_name_meant(
    with_cloud: DaemonHandle, typed: str, meant: str
) -> None:
    """Walk finding: `locod chat --model gpt-4o-mini` (the endpoint's id of cloud model gpt-mini) said only
    "the daemon has no model named ..."; `locod ask` added the name meant. Chat's check was a weaker twin of
    the daemon's refusal; it now uses the daemon's rule, which also names a local model given by its file."""
    asked, chatted = _refusal(with_cloud, "ask", typed), _refusal(with_cloud, "chat", typed)
    assert asked == chatted, (asked, chatted)
    assert meant in asked, asked
    assert with_cloud.rows() == []  # refused before any turn


def test_a_model_named_by_its_file_s_path_is_told_its_name(with_cloud: DaemonHandle, model_path: Path) -> None:
    """A GGUF's path, as llama.cpp takes it (`-m ~/models/x.gguf`), was told only that a file is not a name;
    the file of a configured model is told the name it has."""
    asked = _refusal(with_cloud, "ask", str(model_path))
    assert asked == _refusal(with_cloud, "chat", str(model_path))
    assert f"is the GGUF file of local model {LOCAL!r}: name {LOCAL!r}" in asked, asked
    other = _refusal(with_cloud, "chat", "/nowhere/other.gguf")  # a file no model has: how to configure one
    assert "a GGUF file is not a model's name" in other, other


def test_chat_still_takes_a_model_the_daemon_offers(with_cloud: DaemonHandle) -> None:
    """The check refuses names the daemon does not offer, nothing else: the local model answers."""
    chat = with_cloud.cli("chat", "--model", LOCAL, "--max-tokens", "2", stdin="hi\n")
    assert chat.returncode == 0, chat.stderr
    assert [row["model"] for row in with_cloud.rows()] == [LOCAL]


def test_an_unquoted_prompt_is_asked_whole(daemon: DaemonHandle) -> None:
    """Walk finding: `locod ask hi there` said "unrecognized arguments: there". The words are one prompt, as
    `echo` prints them, options among them still read as options, and after `--` a word that begins with -
    is a word."""
    asked = daemon.cli("ask", "Say", "hi", "--max-tokens", "2", "to", "Ann", "--json")
    assert asked.returncode == 0, asked.stderr
    assert json.loads(asked.stdout.splitlines()[-1])["type"] == "done"  # --json after the words was read
    dashed = daemon.cli("ask", "--max-tokens", "2", "--", "-x", "marks", "the", "spot")
    assert dashed.returncode == 0, dashed.stderr
    assert [row["prompt_chars"] for row in daemon.rows()] == [len("Say hi to Ann"), len("-x marks the spot")]


def test_an_unknown_option_among_the_words_is_still_refused(daemon: DaemonHandle) -> None:
    """An unknown option is not taken as a word of the prompt: it is named, with how to give such a word."""
    refused = daemon.cli("ask", "hi", "-x", "there")
    assert refused.returncode == 2, refused.stderr
    assert "no such option: -x;" in refused.stderr and "goes after --" in refused.stderr, refused.stderr
    assert daemon.rows() == []


def test_decisions_that_match_nothing_name_the_filters_given(daemon: DaemonHandle) -> None:
    """`locod decisions --session nope` said "no decision record matches --session, --location, --outcome,
    --since and --before as given": all five, whichever were given. It names those given, as typed."""
    listed = daemon.cli("decisions", "--session", "no such", "--outcome", "ok", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []
    assert "no decision record matches --session 'no such' --outcome ok" in listed.stderr, listed.stderr
    assert "--location" not in listed.stderr, listed.stderr


def test_chat_lists_the_local_models_left_out_for_their_file_as_ask_does(daemon_factory: Any, tmp_path: Path) -> None:
    """Chat's own check listed a local model whose file is missing among the names to use; the daemon's rule,
    now chat's too, lists it apart, with why."""
    gone = {"name": "gone", "path": str(tmp_path / "nowhere.gguf")}
    handle = daemon_factory({"local": {"models": [gone]}})
    asked, chatted = _refusal(handle, "ask", "nope"), _refusal(handle, "chat", "nope")
    assert asked == chatted, (asked, chatted)
    assert f"local models: [{LOCAL!r}], cloud models: []; left out until their file can be loaded: 'gone'" in asked


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["models", "pull", "http://127.0.0.1:9/x.gguf", "--max-size", "lots"], "argument --max-size: expects a size"),
        (["models", "pull", "http://127.0.0.1:9/x.gguf", "--ctx", "64"], "argument --ctx: must be between 128"),
        (["models", "pull", "http://127.0.0.1:9/x.gguf", "--ctx", "many"], "argument --ctx: expects a whole number"),
        (["models", "pull", "http://127.0.0.1:9/x.gguf", "--sha256", "abc"], "argument --sha256: expects 64 hex"),
        (["models", "pull", "http://127.0.0.1:9/x.gguf", "--name", "a/b"], "argument --name: model name 'a/b': use"),
        (["report", "--out", "report.txt"], "argument --out: must end in .png or .html, got 'report.txt'"),
    ],
)
def test_a_wrong_flag_value_is_a_usage_error(tmp_path: Path, argv: list[str], said: str) -> None:
    """Sweep finding: `models pull --max-size lots` (and --ctx, --sha256, --name) and `report --out x.txt`
    exited 1, a refused request, where the exit statuses say 2 for a wrong command line, as a wrong --since
    or --limit is. Their rules now check them as the command line is read, under the command's usage."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCOD_", "XDG_"))}
    env.update(LOCOD_STATE_DIR=str(tmp_path / "state"), LOCOD_MODELS_DIR=str(tmp_path / "models"), HOME=str(tmp_path))
    result = subprocess.run(locod_command(*argv), capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"usage: locod {' '.join(argv[:2] if argv[0] == 'models' else argv[:1])}" in result.stderr
    assert said in result.stderr, result.stderr
    assert not (tmp_path / "models").exists()  # nothing downloaded


def test_stop_refuses_a_negative_timeout_before_signalling(daemon: DaemonHandle) -> None:
    """Sweep finding: `locod stop --timeout -1` sent the daemon SIGTERM, then said at once "still stopping
    after -1 s; see its log" and exited 1. A timeout below 0 (or nan) is now a usage error: nothing is sent."""
    for wrong in ("-1", "nan"):
        refused = daemon.cli("stop", "--timeout", wrong)
        assert refused.returncode == 2 and "argument --timeout: must be 0 or more seconds" in refused.stderr
    assert daemon.proc.poll() is None  # still serving
    assert daemon.cli("status").returncode == 0
