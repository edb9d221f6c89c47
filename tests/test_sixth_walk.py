"""A sixth new user's walk: docs/config.example.toml copied and edited, a model whose file is not there yet
seen through the openai client, the decision log read back, quickstart run twice, the user uninstall, a
pull, a tcp endpoint with a secret, and the CLI's words. Each through the real CLI and scripts, a real
daemon with the real model, and the real openai client."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from .conftest import REPO, DaemonHandle, cloud_config, free_port, locod_command, start_daemon, write_config
from .fileserver import FileServer, Served


def test_decisions_print_latencies_as_whole_milliseconds(daemon: DaemonHandle) -> None:
    """Walk finding: `locod decisions` showed 1.417e+04 and 87.77 in latency_total_ms, `ask -v` 14169 ms.
    Before that first turn, status's local line said "(resident: smollm2-135m-instruct; n/a)": n/a what?"""
    assert "(resident: smollm2-135m-instruct, 139 of 4096 MiB; n/a tok/s)" in daemon.cli("status").stdout
    assert daemon.cli("ask", "Hi", "--max-tokens", "4").returncode == 0
    (row,) = daemon.rows()
    listed = daemon.cli("decisions").stdout
    header, line = listed.splitlines()
    at = header.index("latency_total_ms")
    shown = line[at:].split()[0]
    assert shown == f"{row['latency_total_ms']:.0f}", listed


def test_the_http_api_offers_no_model_whose_file_is_missing(daemon_factory: Any, tmp_path: Path) -> None:
    """Walk finding: config.example.toml's second model (a path not on this machine) was listed by
    GET /v1/models, and asking for it answered 500, which the openai client retried twice before raising
    InternalServerError; routing had left it out all along. The daemon's start had also warned "no predictor
    prior for ...: [Errno 2] No such file or directory" about it, and the error told this user-named model's
    user to "run `locod models fetch` for the embedded model"."""
    port = free_port()
    later = tmp_path / "later.gguf"
    handle = daemon_factory(
        {"local": {"models": [{"name": "later", "path": str(later)}]}}, extra_env={"LOCOD_HTTP": f"127.0.0.1:{port}"}
    )
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["auto", "smollm2-135m-instruct"]
    with pytest.raises(openai.NotFoundError) as retrieved:
        client.models.retrieve("later")
    assert retrieved.value.code == "model_missing" and f"file {later} not found" in retrieved.value.message
    with pytest.raises(openai.NotFoundError) as asked:
        client.chat.completions.create(model="later", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert asked.value.code == "model_missing" and f"file {later} not found" in asked.value.message
    assert asked.value.message.endswith("fix its path in the config, or download it with `locod models pull`")
    assert "no predictor prior" not in handle.log()  # the missing file is said once, by routing, not as an errno

    later.write_text("not a model")  # there, but no GGUF: retrieve said model_missing where a turn said corrupt
    with pytest.raises(openai.NotFoundError) as retrieved:
        client.models.retrieve("later")
    assert retrieved.value.code == "model_corrupt" and f"{later} is not a GGUF file" in retrieved.value.message
    with pytest.raises(openai.NotFoundError) as asked:
        client.chat.completions.create(model="later", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert asked.value.code == "model_corrupt"

    later.write_bytes(Path(handle.env["LOCOD_MODELS_DIR"], "SmolLM2-135M-Instruct.Q4_1.gguf").read_bytes())
    assert "later" in [m.id for m in client.models.list()]  # offered again once the file is there
    answer = client.chat.completions.create(model="later", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert answer.model == "later"


def test_an_unknown_chat_format_is_a_config_error(daemon: DaemonHandle, models_dir: Path, tmp_path: Path) -> None:
    """Walk finding: a second model with ``chat_format = "chatmlx"`` (a typo of chatml) was reloaded without a
    word, and each of its turns then failed with "locod: internal error:
    LlamaChatCompletionHandlerNotFoundException". A rejected reload was said on stdout, exiting 2."""
    model = {"name": "mine", "path": "SmolLM2-135M-Instruct.Q4_1.gguf", "chat_format": "chatmlx"}
    write_config(daemon.config_path, {"local": {"models": [model]}})
    refused = daemon.cli("reload")
    said = f"{daemon.config_path}: local model 'mine': chat_format 'chatmlx' is not one llama-cpp-python knows"
    assert refused.returncode == 2 and said in refused.stderr and not refused.stdout, refused  # was on stdout
    assert "'chatml'" in refused.stderr and "leave it out to use the GGUF's own chat template" in refused.stderr
    assert "not known to the running daemon until `locod reload`: mine" in daemon.cli("models", "list").stdout

    fresh = start_daemon(tmp_path / "fresh", models_dir, {"local": {"models": [model]}}, wait=False)
    assert fresh.proc.wait(60) == 2
    assert "chat_format 'chatmlx' is not one llama-cpp-python knows" in fresh.log() and "Traceback" not in fresh.log()

    model["chat_format"] = "chatml"
    write_config(daemon.config_path, {"local": {"models": [model]}})
    assert daemon.cli("reload").returncode == 0
    assert daemon.cli("ask", "Hi", "--model", "mine", "--max-tokens", "2").returncode == 0


def test_chat_takes_the_model_and_answer_length_that_ask_takes(daemon_factory: Any) -> None:
    """Walk finding: after `locod ask --model mine` worked, `locod chat --model mine` was "unrecognized
    arguments": a chat could only be routed or forced to a location, never held to the model just added."""
    mine = {"name": "mine", "path": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    handle = daemon_factory({"routing": {"mode": "auto"}, "local": {"models": [mine]}})
    chat = handle.cli("chat", "--model", "mine", "--max-tokens", "3", stdin="Hi\nAnd again\n")
    assert chat.returncode == 0, chat.stderr
    rows = handle.rows()
    assert [(r["model"], r["turn"], r["tokens_out"] <= 3) for r in rows] == [("mine", 0, True), ("mine", 1, True)]
    assert rows[0]["reason"] == "the request named this local model" and rows[0]["session"] == rows[1]["session"]

    unknown = handle.cli("chat", "--model", "mnie", stdin="Hi\nAnd again\n")  # said at once, not at each turn
    assert unknown.returncode != 0 and unknown.stderr.count("no model named 'mnie'") == 1, unknown.stderr
    assert "local models: ['smollm2-135m-instruct', 'mine']" in unknown.stderr and len(handle.rows()) == 2


def _quickstart_checkout(tmp_path: Path, models_dir: Path) -> tuple[Path, dict[str, str]]:
    """scripts/quickstart.sh in a checkout of its own, and a new user's environment (a HOME of nothing yet).
    Its .venv is this test's own environment: what quickstart installs is not under test here."""
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts/quickstart.sh", checkout / "scripts")
    venv = checkout / ".venv/bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text(f'#!/bin/sh\n[ "$1 $2" = "-m pip" ] && exit 0\nexec {sys.executable} "$@"\n')
    (venv / "locod").write_text(f'#!/bin/sh\nexec {sys.executable} -m locod.cli "$@"\n')
    for script in venv.iterdir():
        script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCOD_", "XDG_"))}
    env.update(HOME=str(tmp_path / "home"), LOCOD_RUNTIME_DIR=str(tmp_path / "run"), LOCOD_MODELS_DIR=str(models_dir))
    return checkout, env


def test_quickstart_says_at_once_why_the_daemon_did_not_start(tmp_path: Path, models_dir: Path) -> None:
    """Walk finding: with docs/config.example.toml copied to ~/.config/locod/config.toml, as its first line
    says, scripts/quickstart.sh started a daemon that exited at once (the example's api_key_file,
    /etc/locod/openai.key, is not on this machine), waited a minute for it, and then `locod ask` said only
    that locod was not running."""
    checkout, env = _quickstart_checkout(tmp_path, models_dir)
    home = Path(env["HOME"])
    (home / ".config/locod").mkdir(parents=True)
    example = (REPO / "docs/config.example.toml").read_text().replace("127.0.0.1:8080", f"127.0.0.1:{free_port()}")
    (home / ".config/locod/config.toml").write_text(example)

    started = time.monotonic()
    run = subprocess.run(["bash", "scripts/quickstart.sh"], cwd=checkout, env=env, capture_output=True, text=True)
    assert run.returncode == 1 and time.monotonic() - started < 60, run.stderr  # it waited 76 s before
    log = home / ".local/state/locod/daemon.log"
    assert f"the daemon did not start; the end of {log}:" in run.stderr
    assert "api_key_file /etc/locod/openai.key: No such file or directory" in run.stderr, run.stderr
    assert f"{home / '.config/locod/config.toml'}: cloud model" in run.stderr  # the file that names the key file
    again = subprocess.run(["bash", "scripts/quickstart.sh"], cwd=checkout, env=env, capture_output=True, text=True)
    assert again.stderr.count("openai.key: No such file") == 1, again.stderr  # this start's lines, not the last's


def test_policy_train_and_report_say_where_their_files_go(tmp_path: Path) -> None:
    """Walk finding: `locod policy train --help` said "--out OUT  where to write the ONNX policy" and
    "--steps STEPS" with nothing more, while the README promises policy.onnx in the state directory; and
    `locod report --out` of a folder named it by its last part."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCOD_", "XDG_"))}
    env.update(LOCOD_STATE_DIR=str(tmp_path / "state"), LOCOD_RUNTIME_DIR=str(tmp_path / "run"), COLUMNS="300")
    (tmp_path / "none.toml").write_text("")
    command = locod_command("--config", str(tmp_path / "none.toml"), "policy", "train", "--help")
    shown = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert f"(default: {tmp_path / 'state' / 'policy.onnx'}, which the daemon loads" in shown.stdout, shown.stdout
    assert "environment steps, 1 or more, run in whole rollouts of 2048 (default: 200000)" in shown.stdout
    folder = subprocess.run(  # a folder for --out was named by its last part alone: "got 'walk6'"
        locod_command("--config", str(tmp_path / "none.toml"), "report", "--out", f"{tmp_path}/"),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert f"--out: must end in .png or .html, got {str(tmp_path)!r}" in folder.stderr, folder.stderr


def test_the_user_uninstall_names_what_it_keeps_and_leaves_another_locod_alone(tmp_path: Path) -> None:
    """Walk finding: `scripts/uninstall.sh --user` said "kept its state and configuration" without saying
    where, had no --help (install.sh has one), and removed any ~/.local/bin/locod symlink, install.sh's or
    not."""
    home = tmp_path / "home"
    state, data, config = home / ".local/state/locod", home / ".local/share/locod", home / ".config"
    for folder in (state, data / "venv/bin", data / "models", config / "locod", config / "systemd/user"):
        folder.mkdir(parents=True)
    (config / "systemd/user/locod.service").write_text("[Service]\n")
    (home / ".local/bin").mkdir()
    (home / ".local/bin/locod").symlink_to(tmp_path / "pipx/locod")  # another install's
    env = {"PATH": os.environ["PATH"], "HOME": str(home)}
    script = str(REPO / "scripts/uninstall.sh")

    shown = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, env=env)
    assert shown.returncode == 0 and "scripts/uninstall.sh --user [--purge]" in shown.stdout, shown
    removed = subprocess.run(["bash", script, "--user"], capture_output=True, text=True, env=env)
    assert removed.returncode == 0, removed.stderr
    kept = f"kept {state} (decision log, router state), {data}/models and {config}/locod (use --purge"
    assert kept in removed.stderr, removed.stderr
    assert not (data / "venv").exists() and not (config / "systemd/user/locod.service").exists()
    assert (home / ".local/bin/locod").is_symlink() and state.is_dir() and (data / "models").is_dir()

    (home / ".local/bin/locod").unlink()
    (home / ".local/bin/locod").symlink_to(data / "venv/bin/locod")  # install.sh's
    assert subprocess.run(["bash", script, "--user", "--purge"], env=env, capture_output=True).returncode == 0
    assert not (home / ".local/bin/locod").is_symlink() and not state.exists() and not data.exists()


def test_status_says_which_policy_routes_and_why_the_one_named_does_not(daemon_factory: Any, tmp_path: Path) -> None:
    """Walk finding: with LOCOD_POLICY naming a file that is not there, the daemon routed with MESS+ alone
    and said so in its log only: `locod status` showed the same routing line as with the policy."""
    shipped = daemon_factory(name="shipped").cli("status").stdout
    assert "routing  mode auto, policy rcppo-" in shipped and "warning" not in shipped, shipped
    handle = daemon_factory(name="typo", extra_env={"LOCOD_POLICY": str(tmp_path / "polcy.onnx")})
    status = handle.cli("status").stdout
    assert "routing  mode auto, policy none (MESS+ alone), SLA 0.80" in status, status
    assert f"warning: policy file {tmp_path / 'polcy.onnx'} not found; routing with MESS+ alone" in status


def test_fetching_a_model_not_in_the_manifest_points_at_pull(tmp_path: Path) -> None:
    """Walk finding: `locod models fetch qwen` answered "unknown model 'qwen'; the manifest has:
    smollm2-135m-instruct" and stopped there: fetch is only for the embedded model, pull for any other."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCOD_", "XDG_"))}
    env.update(LOCOD_MODELS_DIR=str(tmp_path / "models"), LOCOD_RUNTIME_DIR=str(tmp_path / "run"))
    (tmp_path / "none.toml").write_text("")
    command = locod_command("--config", str(tmp_path / "none.toml"), "models", "fetch", "qwen")
    fetched = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert fetched.returncode == 1 and "(any other GGUF: `locod models pull URL`" in fetched.stderr, fetched.stderr


def test_the_log_names_the_endpoint_whose_breaker_opened(daemon_factory: Any) -> None:
    """Walk finding: "cloud circuit breaker open after 3 failures; retrying in 60 s" named no endpoint, though
    each endpoint has a breaker of its own."""
    dead = f"http://127.0.0.1:{free_port()}/v1"
    handle = daemon_factory(cloud_config(dead, max_retries=0))
    for _ in range(3):
        assert handle.cli("ask", "Hi", "--max-tokens", "2").returncode == 0  # answered locally instead
    assert f"cloud circuit breaker of {dead} open after 3 failures; retrying in 600 s" in handle.log()


def test_quickstart_run_again_says_the_running_daemon_keeps_its_code(tmp_path: Path, models_dir: Path) -> None:
    """Walk finding: after a `git pull`, scripts/quickstart.sh installed the new code, found the daemon of
    the first run answering, and asked it the first question again: the old code went on running, unsaid."""
    checkout, env = _quickstart_checkout(tmp_path, models_dir)

    def quickstart() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "scripts/quickstart.sh"], cwd=checkout, env=env, capture_output=True, text=True, timeout=300
        )

    try:
        first = quickstart()
        assert first.returncode == 0 and "locod daemon started" in first.stderr, first.stderr
        assert "already running" not in first.stderr
        again = quickstart()
        assert again.returncode == 0 and "locod daemon started" not in again.stderr, again.stderr
        assert "locod was already running and keeps the code it started with: .venv/bin/locod stop" in again.stderr
    finally:
        subprocess.run([str(checkout / ".venv/bin/locod"), "stop"], env=env, capture_output=True, timeout=120)


def test_pull_says_the_running_daemon_needs_a_reload_before_model_names_it(
    daemon_factory: Any, models_dir: Path, tmp_path: Path
) -> None:
    """Walk finding: `locod models pull` ended "use it with --model tiny-chat, or set local.default = ... and
    `locod reload`", and `locod ask --model tiny-chat`, right after, was refused: the reload is needed for
    --model too."""
    embedded = models_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"
    own = tmp_path / "models"  # pulled.toml is written here, not in the models folder the other tests share
    own.mkdir()
    (own / embedded.name).symlink_to(embedded)
    daemon = daemon_factory(extra_env={"LOCOD_MODELS_DIR": str(own)})
    files = FileServer(files={"tiny-chat.gguf": Served(embedded.read_bytes())}).start()
    try:
        pulled = daemon.cli("models", "pull", f"{files.url}/files/tiny-chat.gguf")
    finally:
        files.stop()
    assert pulled.returncode == 0, pulled.stderr
    assert "a running daemon offers it after `locod reload`: then --model tiny-chat names it" in pulled.stderr
    assert daemon.cli("reload").returncode == 0
    assert daemon.cli("ask", "Hi", "--model", "tiny-chat", "--max-tokens", "2").returncode == 0


def test_an_unsafe_runtime_directory_is_refused_with_what_to_do(tmp_path: Path, models_dir: Path) -> None:
    """Walk finding: LOCOD_RUNTIME_DIR under a world-writable folder of the user's own stopped the daemon
    with why ("another user could read or replace what the daemon keeps there") but no way out."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    handle = start_daemon(tmp_path / "d", models_dir, wait=False, extra_env={"LOCOD_RUNTIME_DIR": str(shared / "run")})
    assert handle.proc.wait(60) == 4
    assert f"refusing {shared}: it is writable by others" in handle.log()
    assert "fix its owner or mode, or set paths.state_dir and paths.runtime_dir ($LOCOD_STATE_DIR" in handle.log()


def test_a_flag_out_of_range_is_named_as_the_flag(tmp_path: Path) -> None:
    """Walk finding: `locod ask --temperature 3` said "field 'options.temperature' must be a number between
    0 and 2", a protocol field the user never typed, and only after reaching the daemon."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCOD_", "XDG_"))}
    env.update(LOCOD_RUNTIME_DIR=str(tmp_path / "nothing-here"))
    for args, said in (
        (("ask", "Hi", "--temperature", "3"), "locod ask: error: argument --temperature: must be a number between 0"),
        (("ask", "Hi", "--max-tokens", "x"), "locod ask: error: argument --max-tokens: expects a whole number, got"),
        (("chat", "--max-tokens", "0"), "locod chat: error: argument --max-tokens: must be an integer between 1 and"),
    ):
        refused = subprocess.run(locod_command(*args), capture_output=True, text=True, env=env, timeout=60)
        assert refused.returncode == 2 and said in refused.stderr and "options." not in refused.stderr, refused


def test_a_tcp_endpoint_that_wants_its_secret_says_how_the_cli_gives_it(daemon_factory: Any, tmp_path: Path) -> None:
    """Walk finding: `locod --endpoint tcp://... decisions` without the secret answered "this tcp endpoint
    needs the shared secret in field 'secret'": a protocol field no flag of the CLI is named after."""
    secret = tmp_path / "tcp.secret"
    secret.write_text("s3cret-walk6\n")
    secret.chmod(0o600)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    handle = daemon_factory({"daemon": {"tcp": endpoint, "tcp_secret_file": str(secret)}})
    refused = handle.cli("--endpoint", endpoint, "decisions")
    assert refused.returncode == 1 and "needs the shared secret" in refused.stderr, refused.stderr
    assert "locod's CLI sends it with --secret-file FILE or $LOCOD_SECRET" in refused.stderr
    assert handle.cli("--endpoint", endpoint, "--secret-file", str(secret), "decisions").returncode == 0


def test_every_argument_of_every_command_says_what_it_takes() -> None:
    """Walk finding: `locod models pull --help` listed "source" with no word on what it takes (a path to a
    GGUF on disk is the first guess, and refused), and `models list --json`, `models rm NAME` the same."""
    import argparse

    from locod.cli import _parser

    def silent(parser: argparse.ArgumentParser, command: str) -> Iterator[str]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from silent(sub, f"{command} {name}")
            elif action.help is None:
                yield f"{command}: {action.dest}"

    assert list(silent(_parser(), "locod")) == []


def test_review_of_the_walks_fixes(tmp_path: Path, models_dir: Path) -> None:
    """A review of this walk's fixes: a model path that cannot even be looked at (under a file, or a
    directory the service may not enter) has no prior and no traceback; a GGUF's own named template passes
    the chat_format check; the embedded model declared again with its GPU layers is still fetched by
    `locod models fetch`; `--stop` is checked by the flag's name before anything is sent."""
    from locod.daemon.config import EMBEDDED_MODEL, load_config
    from locod.daemon.local import check_chat_formats
    from locod.daemon.modelfile import check_model_file
    from locod.errors import ModelError
    from locod.policy.warmstart import load_prior

    assert load_prior(Path("/etc/passwd/model.gguf")) is None  # NotADirectoryError, as EACCES: no prior
    config = write_config(
        tmp_path / "config.toml",
        {"local": {"models": [{"name": "mine", "path": "x.gguf", "chat_format": "chat_template.default"}]}},
    )
    check_chat_formats(load_config(config, env={}))  # the GGUF's metadata decides, once it loads
    on_gpu = dataclasses.replace(EMBEDDED_MODEL, n_gpu_layers=-1)
    with pytest.raises(ModelError, match="run `locod models fetch`"):
        check_model_file(on_gpu, tmp_path / "no-models")

    ask = [*locod_command("ask", "Hi", "--stop", "")]
    empty = subprocess.run(ask, capture_output=True, text=True, timeout=60)
    assert empty.returncode == 2 and "argument --stop: must be 1 to 200 characters, got 0" in empty.stderr
    five = subprocess.run([*locod_command("ask", "Hi"), *("--stop", "x") * 5], capture_output=True, text=True)
    assert five.returncode == 2 and "argument --stop: at most 4 of them, got 5" in five.stderr, five.stderr
