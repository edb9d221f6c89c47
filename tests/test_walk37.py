"""Walk 37: a laptop user from Ollama and the OpenAI Python client, setting locod up from README.md: the
quick start, a chat with a photo and notes, llama.cpp's server as the cloud with a key file, the HTTP door
with the SDK, a config key changed and reloaded, a typo reloaded, the daemon restarted. Real daemons (the
embedded model) and the real `locod` command."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from .conftest import DaemonHandle, free_port, locod_command

CUT = "[the answer stopped at its length limit"


def test_a_typo_reloaded_is_said_once(daemon: DaemonHandle) -> None:
    """Walk finding: `locod reload` after a typo in the config printed the same error twice, first as the
    command's own warning ("...; using the daemon at ..."), then as the daemon's rejection of the file."""
    daemon.config_path.write_text(daemon.config_path.read_text() + '\n[routng]\nmode = "local"\n')
    reload = daemon.cli("reload")
    assert reload.returncode == 2, reload.stderr
    assert "reload rejected" in reload.stderr and reload.stderr.count("unknown key 'routng'") == 1, reload.stderr


def test_a_listen_address_set_and_reloaded_is_said_to_wait_for_a_restart(daemon: DaemonHandle) -> None:
    """Walk finding: with `[http] listen` added to the config and `locod reload` run, `locod status` went on
    saying "http off: set http.listen to serve it", which sent the user looking for a typo in what they had
    just set. Status now says the change waits for a restart, and how to restart, for as long as it waits."""
    good = daemon.config_path.read_text()
    daemon.config_path.write_text(good + f'\n[http]\nlisten = "127.0.0.1:{free_port()}"\n')
    reload = daemon.cli("reload")
    assert reload.returncode == 0, reload.stderr
    assert "changed in [http]: takes effect when the daemon restarts" in reload.stdout, reload.stdout
    assert "`locod stop`, then start it as before" in reload.stdout, reload.stdout
    status = daemon.cli("status")
    assert status.returncode == 0, status.stderr
    assert "http  off until the daemon restarts" in status.stdout and "set http.listen" not in status.stdout
    assert "warning: changed in [http]: takes effect when the daemon restarts" in status.stdout, status.stdout
    assert json.loads(daemon.cli("status", "--json").stdout)["restart_needed"] == ["http"]
    daemon.config_path.write_text(good)  # changed back: nothing waits any more
    assert daemon.cli("reload").returncode == 0
    status = daemon.cli("status")
    assert "http  off: set http.listen" in status.stdout and "warning: changed" not in status.stdout, status.stdout
    assert json.loads(daemon.cli("status", "--json").stdout)["restart_needed"] == []


def test_an_answer_cut_at_its_length_limit_says_so(daemon_factory: Any) -> None:
    """Walk finding: "Write a 1000 word essay" ended mid-word at 256 tokens, local.max_tokens's default, with
    nothing said: an Ollama user (no limit by default) took it for the model's whole answer. One line on stderr
    now says the limit was reached and what raises it, in `ask` and `chat`, as the HTTP door's finish_reason
    `length` does."""
    daemon = daemon_factory({"local": {"max_tokens": 4}})
    story = "Tell me a long story about the sea."
    default = daemon.cli("ask", "--seed", "1", story)
    assert default.returncode == 0, default.stderr
    assert daemon.rows()[-1]["tokens_out"] == 4
    said = f"{CUT}, 4 tokens: for a longer one, --max-tokens N, or local.max_tokens in the config]"
    assert said in default.stderr and said not in default.stdout, default.stderr
    asked = daemon.cli("ask", "--max-tokens", "3", "--seed", "1", story)
    assert f"{CUT}, 3 tokens: for a longer one, --max-tokens N]" in asked.stderr, asked.stderr
    chat = daemon.cli("chat", "--max-tokens", "3", stdin=f"{story}\n")
    assert chat.returncode == 0 and f"{CUT}, 3 tokens" in chat.stderr, chat.stderr
    room = daemon.cli("ask", "--max-tokens", "200", "--seed", "1", "Say hello.")  # room to end on its own
    assert room.returncode == 0, room.stderr
    assert (CUT in room.stderr) == (daemon.rows()[-1]["tokens_out"] >= 200), room.stderr
    as_json = daemon.cli("ask", "--json", "--max-tokens", "3", story)  # the frames are the output: nothing added
    assert as_json.returncode == 0 and CUT not in as_json.stdout + as_json.stderr


def test_an_answer_cut_by_a_full_context_says_so(daemon_factory: Any) -> None:
    """The same finding where a local model's context fills before the length limit: the limit is not what
    cut it, and the line says what is."""
    model = {"name": "smollm2-135m-instruct", "path": "SmolLM2-135M-Instruct.Q4_1.gguf", "n_ctx": 128}
    daemon = daemon_factory({"local": {"models": [model]}})
    essay = daemon.cli("ask", "--max-tokens", "1000", "--seed", "1", "Write a 1000 word essay about the sea.")
    assert essay.returncode == 0, essay.stderr
    assert daemon.rows()[-1]["tokens_out"] < 1000
    assert "[the answer stopped where the model's context was full" in essay.stderr and CUT not in essay.stderr


@pytest.mark.parametrize(
    ("word", "meaning"),
    [
        ("explain", "`locod decisions ID` shows one turn: where it ran and why"),
        ("why", "`locod decisions ID` shows one turn"),
        ("restart", "`locod stop`, then start it as before"),
        ("logs", "journalctl --user -u locod"),
    ],
)
def test_commands_typed_from_habit_are_named_with_locod_s_own(word: str, meaning: str) -> None:
    """Walk finding: `locod explain 15` (the turn's why), `locod restart` (after a change that waits for a
    restart) and `locod logs` got argparse's "invalid choice" and the list of commands, none of which says
    where a turn's why, a restart or the daemon's log is."""
    result = subprocess.run(locod_command(word, "15"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and f"locod has no {word!r} command" in result.stderr, result.stderr
    assert meaning in result.stderr, result.stderr


def test_chat_help_names_the_chat_s_own_commands() -> None:
    """Walk finding: `locod chat --help` said nothing of /attach, /private or /bye: the banner said them only
    once the chat had started."""
    result = subprocess.run(locod_command("chat", "--help"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    words = " ".join(result.stdout.split())  # argparse wraps the description
    assert "/attach FILE (or /private FILE) adds a file to the next question" in words and "/bye" in words


def test_a_stop_refused_for_a_typo_names_the_daemon_and_how_to_stop_it(daemon: DaemonHandle) -> None:
    """Walk finding: with a typo in the config, `locod stop` printed the config's error alone: the user could
    not tell whether the daemon had stopped (it had not: a config that does not load names no socket, and stop
    never falls back to another daemon's), nor how to stop it before fixing the file."""
    daemon.config_path.write_text(daemon.config_path.read_text() + "\n[cloud]\ndaily_cap = 1\n")
    refused = daemon.cli("stop")
    assert refused.returncode == 2 and "unknown key 'cloud.daily_cap'" in refused.stderr, refused.stderr
    said = f"the daemon at {daemon.endpoint} was not stopped: fix the configuration, or `locod --endpoint "
    assert said in refused.stderr and daemon.proc.poll() is None, refused.stderr
    stop = daemon.cli("--endpoint", daemon.endpoint, "stop")  # the command it names
    assert stop.returncode == 0 and daemon.proc.wait(60) == 0, stop.stderr
