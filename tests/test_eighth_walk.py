"""An eighth new user's walk: someone who brings their own GGUF and their own cloud, and runs locod as a
service they operate (backups, a full disk, key rotation), integrating over the socket from another
language. Each through the real `locod` command, a real daemon with the real model, a real loopback file
server and a real tmpfs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from locod.daemon.cloud import CONTEXT_REFUSAL
from locod.errors import StorageError
from locod.words import dollars

from .conftest import (
    MODEL_NAME,
    REPO,
    CloudServer,
    DaemonHandle,
    cloud_config,
    daemon_on_a_full_disk,
    free_port,
    locod_command,
    start_daemon,
)
from .faultproxy import Fault, FaultProxy
from .fileserver import FileServer, Served, gguf_bytes


def locod(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(locod_command(*args), capture_output=True, text=True, env=env, timeout=120)


def test_a_pull_from_a_plain_url_says_its_checksum_was_not_checked(tmp_path: Path) -> None:
    """Walk finding: `locod models pull http://.../model.gguf` (the README: "checks the GGUF header and the
    SHA-256") said only "installed at ...": from a plain URL nothing publishes a SHA-256, so none was
    checked, and nothing said so; the user took a file from their own server for a verified one. And the
    model was named mine.q4 where --help promised "the file's name"."""
    data = gguf_bytes(1 << 20)
    digest = hashlib.sha256(data).hexdigest()
    server = FileServer({"Mine.Q4.gguf": Served(data), "again.gguf": Served(data)}).start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOCOD_")}
        env.update(LOCOD_MODELS_DIR=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "none"))
        env["LOCOD_RUNTIME_DIR"] = str(tmp_path / "run")
        pulled = locod(env, "models", "pull", f"{server.url}/files/Mine.Q4.gguf")
        assert pulled.returncode == 0, pulled.stderr
        assert f"mine.q4: its SHA-256 is {digest}, not checked" in pulled.stderr, pulled.stderr
        assert "--sha256" in pulled.stderr
        checked = locod(env, "models", "pull", f"{server.url}/files/again.gguf", "--sha256", digest)
        assert checked.returncode == 0, checked.stderr
        assert "not checked" not in checked.stderr, checked.stderr
        # The name it got is the file's, in lower case: --help says so (it said "the file's name").
        assert "in lower case" in " ".join(locod(env, "models", "pull", "--help").stdout.split())
    finally:
        server.stop()


def test_a_full_disk_says_so_and_what_to_do(tmp_path: Path, models_dir: Path, small_disk: Path) -> None:
    """Walk finding: with the state directory's disk full, `locod ask` said "recording the turn failed:
    database or disk is full", code ``storage`` (a code docs/protocol.md does not list), and nothing on what
    to do: that freeing space is enough, without a restart."""
    with daemon_on_a_full_disk(tmp_path / "d", models_dir, small_disk) as (handle, filler):
        client = handle.client()
        refused: Any = None
        for i in range(50):  # the WAL's spare pages fill first
            asked = handle.cli("ask", "word " * 700 + str(i), "--max-tokens", "2", "--force", "local")
            if asked.returncode:
                refused = asked
                break
        assert refused is not None and refused.returncode == 4, refused
        assert "the disk it is on is full; free space there and try again" in refused.stderr, refused.stderr
        assert "needs no restart" in refused.stderr
        with pytest.raises(StorageError) as caught:
            client.ask("still full", max_tokens=2)
        assert caught.value.code == "disk_full"
        # `locod status` says so too while it lasts: it said nothing of the turns being refused.
        shown = handle.cli("status")
        assert "no write has succeeded since this one failed" in shown.stdout + shown.stderr, shown
        assert "the disk it is on is full" in (client.status()["db_warning"] or "")
        filler.unlink()
        assert client.ask("after", max_tokens=2).done.outcome == "ok"
        assert client.status()["db_warning"] is None


def test_a_model_named_by_its_endpoint_id_or_another_case_says_which_name_to_use(daemon_factory: Any) -> None:
    """Walk finding: with ``name = "gpt-mini"``, ``model = "gpt-4o-mini"`` in the config, `locod ask --model
    gpt-4o-mini` (the id the provider's docs use) was refused with the list of names and no word that it is
    gpt-mini's ``model``; `--model Other-Model.Q4_1` (the file's spelling of a pulled model) likewise."""
    cloud = {"name": "gpt-mini", "base_url": "http://127.0.0.1:9/v1", "model": "gpt-4o-mini"}
    handle = daemon_factory({"cloud": {"models": [cloud]}})
    by_id = handle.cli("ask", "Hi", "--model", "gpt-4o-mini")
    assert by_id.returncode == 1, by_id.stderr
    assert "'gpt-4o-mini' is the endpoint's model id of cloud model 'gpt-mini': name 'gpt-mini'" in by_id.stderr
    cased = handle.cli("ask", "Hi", "--model", "SmolLM2-135M-Instruct")
    assert cased.returncode == 1 and "names are case-sensitive: 'smollm2-135m-instruct'" in cased.stderr, cased.stderr


def test_a_reload_says_when_a_key_file_is_not_read_for_the_environments_key(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """Walk finding: the daemon started with $LOCOD_CLOUD_API_KEY (the README's first way) and an
    api_key_file (its second); rotating the key in the file and `locod reload` said "reloaded", and the old
    key from the environment stayed in use, since the variable wins over the file."""
    key_file = tmp_path / "cloud.key"
    key_file.write_text("sk-rotated-in-the-file\n")
    key_file.chmod(0o600)
    models = [
        {"name": "by-env", "base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_file": str(key_file)},
        {
            "name": "by-file",
            "base_url": "http://127.0.0.1:9/v1",
            "model": "m",
            "api_key_env": "LOCOD_WALK8_KEY",  # not set: the file is read
            "api_key_file": str(key_file),
        },
    ]
    handle = daemon_factory({"cloud": {"models": models}}, extra_env={"LOCOD_CLOUD_API_KEY": "sk-from-the-env"})
    reloaded = handle.cli("reload")
    assert reloaded.returncode == 0, reloaded.stderr
    assert (
        f"note: cloud model by-env takes its key from $LOCOD_CLOUD_API_KEY in the daemon's environment, which wins "
        f"over its api_key_file {key_file}" in reloaded.stderr
    ), reloaded.stderr
    assert "by-file" not in reloaded.stderr and "sk-" not in reloaded.stderr + reloaded.stdout


def test_a_reload_names_a_local_model_whose_file_is_not_there(daemon_factory: Any) -> None:
    """Walk finding: a `[[local.models]]` entry added with a typo in its path, then `locod reload`: it said
    "reloaded from ...", and only a later `locod ask --model` said the file was not found."""
    handle = daemon_factory()
    handle.config_path.write_text('[[local.models]]\nname = "mine"\npath = "mine-typo.gguf"\n')
    reloaded = handle.cli("reload")
    assert reloaded.returncode == 0, reloaded.stderr
    missing = Path(handle.env["LOCOD_MODELS_DIR"]) / "mine-typo.gguf"
    said = f"note: model 'mine': file {missing} not found; fix its path in the config, or download it with `locod"
    assert said in reloaded.stderr and "it is left out of routing until then" in reloaded.stderr, reloaded.stderr
    assert "smollm2" not in reloaded.stderr  # the models that are there are not named


def test_decisions_show_where_a_fallen_back_turn_was_answered(daemon_factory: Any) -> None:
    """Walk finding: `locod decisions` showed a turn whose cloud failed as "location cloud, model
    other-model.q4_1" (a local model), and an escalated one as "location local, model gpt-mini": the location
    was where the turn was first sent, the model the one that answered."""
    cloud = {"name": "gpt-mini", "base_url": "http://127.0.0.1:9/v1", "model": "gpt-4o-mini"}
    handle = daemon_factory({"cloud": {"models": [cloud], "max_retries": 0}}, extra_env={"LOCOD_CLOUD_API_KEY": "k"})
    asked = handle.cli("ask", "Hi", "--force", "cloud", "--max-tokens", "2")
    assert asked.returncode == 0 and "answering locally" in asked.stderr, asked.stderr
    (row,) = handle.rows()
    assert (row["location"], row["backend"], row["outcome"]) == ("cloud", "local", "fallback")
    header, line = handle.cli("decisions").stdout.splitlines()
    cells = dict(zip(header.split(), line.split()))
    assert (cells["location"], cells["model"], cells["outcome"]) == ("local", MODEL_NAME, "fallback"), line


def test_a_base_url_without_its_api_path_is_named_on_the_404(daemon_factory: Any, cloud_server: CloudServer) -> None:
    """Walk finding: ``base_url = "http://127.0.0.1:PORT"`` (the server's address, as `llama_cpp.server`
    prints it) got HTTP 404 and "check model and base_url", with no word that the /v1 was missing."""
    address = cloud_server.base_url.removesuffix("/v1")
    cloud = {"name": "mine", "base_url": address, "model": cloud_server.model}
    handle = daemon_factory({"cloud": {"models": [cloud]}}, extra_env={"LOCOD_CLOUD_API_KEY": "k"})
    asked = handle.cli("ask", "Hi", "--force", "cloud", "--max-tokens", "2")
    assert asked.returncode == 0, asked.stderr
    assert "HTTP 404" in asked.stderr and f"answer under a path: '{address}/v1'?" in asked.stderr, asked.stderr


def test_status_shows_a_small_spend_and_the_done_frame_rounds_its_times(
    daemon_factory: Any, cloud_server: CloudServer
) -> None:
    """Walk finding: after cloud turns that `ask -v` priced at $0.00004, `locod status` said "today $0.0000";
    and the `done` frame's ``first_token_ms`` came as 380.47685399942566 beside ``latency_ms`` 675.04."""
    config = cloud_config(cloud_server.base_url, timeout_s=30.0)  # a loaded machine: not a fallback
    handle = daemon_factory(config, extra_env={"LOCOD_CLOUD_API_KEY": "k"})
    asked = handle.cli("ask", "Hi", "--force", "cloud", "--max-tokens", "4", "--json")
    assert asked.returncode == 0, asked.stderr
    done = [json.loads(line) for line in asked.stdout.splitlines() if '"done"' in line][-1]
    assert done["first_token_ms"] == round(done["first_token_ms"], 2), done
    (row,) = handle.rows()
    assert 0 < row["cost_usd"] < 1e-4
    assert f"today {dollars(row['cost_usd'])}" in handle.cli("status").stdout


def test_the_report_names_the_sla_after_a_forced_turn_and_a_small_spend(daemon_factory: Any, tmp_path: Path) -> None:
    """Walk finding: `locod report` said "SLA target: n/a" with routing.sla = 0.9 in the config, because the
    newest turn was forced (such a record keeps no SLA), and "money: $0.0000" after cloud turns."""
    handle = daemon_factory({"routing": {"sla": 0.9}})
    assert handle.cli("ask", "Hi", "--max-tokens", "2").returncode == 0  # routed: its record keeps the SLA
    assert handle.cli("ask", "Hi", "--max-tokens", "2", "--force", "local").returncode == 0
    assert [row["sla"] for row in handle.rows()] == [0.9, None]
    out = tmp_path / "report.html"
    drawn = handle.cli("report", "--since", "1h", "--out", str(out))
    assert drawn.returncode == 0, drawn.stderr
    page = out.read_text()
    assert "<th>SLA target</th><td>90%</td>" in page
    assert "<th>money</th><td>$0.00000, most in a day $0.00000</td>" in page


def test_models_rm_says_the_running_daemon_offers_the_model_until_a_reload(tmp_path: Path, model_path: Path) -> None:
    """Walk finding: `locod models rm NAME` said "removed", and `locod ask --model NAME` still answered
    (the model was loaded) until `locod reload`; `pull` says a reload is needed, `rm` did not."""
    models = tmp_path / "models"
    models.mkdir()
    (models / model_path.name).symlink_to(model_path)
    server = FileServer({"mine.gguf": Served(gguf_bytes(1 << 20))}).start()
    handle = start_daemon(tmp_path / "d", models)
    try:
        assert handle.cli("models", "pull", f"{server.url}/files/mine.gguf").returncode == 0
        assert handle.cli("reload").returncode == 0
        removed = handle.cli("models", "rm", "mine")
        assert removed.returncode == 0, removed.stderr
        assert "the running daemon still lists mine, which it can no longer load, until `locod reload`" in (
            removed.stderr
        )
    finally:
        handle.stop()
        server.stop()


def test_the_protocol_docs_client_runs_as_written(daemon: DaemonHandle) -> None:
    """Walk finding: docs/protocol.md had no client to start from, and said nothing of cancelling or of the
    socket's place; a client written from it alone is now its example, run here against a real daemon."""
    documented = (REPO / "docs/protocol.md").read_text().split("## A client in a few lines", 1)[1]
    example = documented.split("```python\n", 1)[1].split("```", 1)[0]
    env = {**daemon.env, "LOCOD_RUNTIME_DIR": str(daemon.home / "run")}
    ran = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, env=env, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() and "[decision 1: ok via" in ran.stdout, ran.stdout
    (row,) = daemon.rows()
    assert row["session"] == "demo" and row["outcome"] == "ok"


def test_a_reload_takes_a_rotated_http_api_key(daemon_factory: Any, tmp_path: Path) -> None:
    """Walk finding: the HTTP API's key rotated in its ``api_key_file`` and `locod reload`: "reloaded", and
    the old key went on being accepted (and the new one refused) until a restart."""
    key_file = tmp_path / "http.key"
    key_file.write_text("old-key\n")
    key_file.chmod(0o600)
    port = free_port()
    handle = daemon_factory({"http": {"api_key_file": str(key_file)}}, extra_env={"LOCOD_HTTP": f"127.0.0.1:{port}"})

    def models(key: str) -> int:
        url, headers = f"http://127.0.0.1:{port}/v1/models", {"Authorization": f"Bearer {key}"}
        request = urllib.request.Request(url, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    assert (models("old-key"), models("new-key")) == (200, 401)
    key_file.write_text("new-key\n")
    assert handle.cli("reload").returncode == 0
    assert (models("old-key"), models("new-key")) == (401, 200)
    key_file.chmod(0o644)  # a key file it may not use rejects the reload; the key it has stays
    rejected = handle.cli("reload")
    assert rejected.returncode == 2 and "http.api_key_file" in rejected.stderr, rejected.stderr
    assert (models("old-key"), models("new-key")) == (401, 200)


def test_a_reload_takes_a_rotated_tcp_secret(daemon_factory: Any, tmp_path: Path) -> None:
    """The same for the tcp endpoint's shared secret (``daemon.tcp_secret_file``)."""
    secret = tmp_path / "secret"
    secret.write_text("old-secret\n")
    secret.chmod(0o600)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    handle = daemon_factory({"daemon": {"tcp": endpoint, "tcp_secret_file": str(secret)}})
    env = {k: v for k, v in handle.env.items() if k != "LOCOD_SECRET"}

    def status(given: str) -> int:
        return locod({**env, "LOCOD_SECRET": given}, "--endpoint", endpoint, "status", "--json").returncode

    assert status("old-secret") == 0 and status("new-secret") != 0
    secret.write_text("new-secret\n")
    assert handle.cli("reload").returncode == 0
    assert status("new-secret") == 0 and status("old-secret") != 0


def test_a_400_for_a_prompt_past_the_cloud_models_context_names_context_tokens(
    daemon_factory: Any, proxy: FaultProxy
) -> None:
    """Walk finding: a prompt longer than the user's own cloud model's context came back as a bare "HTTP 400"
    fallback; `context_tokens`, which would send such prompts elsewhere, was not named."""
    handle = daemon_factory(cloud_config(proxy.base_url, max_retries=0), extra_env={"LOCOD_CLOUD_API_KEY": "k"})
    said = "This model's maximum context length is 4096 tokens. However, your messages resulted in 6038 tokens."
    proxy.set(Fault("status", status=400, message=said))
    result = handle.client().ask("Hi", max_tokens=4, force="cloud")
    assert result.fallback is not None and "HTTP 400" in result.fallback.message
    assert "set context_tokens for 'cloud-small'" in result.fallback.message, result.fallback.message
    assert "6038" not in result.fallback.message  # the endpoint's words are not repeated


@pytest.mark.parametrize(
    "said",
    [
        "This model's maximum context length is 4096 tokens. However, your messages resulted in 6038 tokens.",
        "Requested tokens (6038) exceed context window of 4096",  # llama-cpp-python's server
        "the request exceeds the available context size, try increasing it",  # llama.cpp's llama-server
        "prompt is too long: 210000 tokens > 200000 maximum",
        "The input token count (1100000) exceeds the maximum number of tokens allowed (1048576).",  # Gemini
        "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. Given: 6038",  # TGI
    ],
)
def test_servers_refusals_of_a_long_prompt_are_recognised(said: str) -> None:
    assert CONTEXT_REFUSAL.search(said)


def test_a_400_that_only_mentions_a_context_gets_no_context_hint() -> None:
    """The hint once matched any 400 with the word "context" in it, e.g. a tool schema's description."""
    assert not CONTEXT_REFUSAL.search("Invalid schema for function 'f': 'context' is not of type 'object'")


def test_status_names_every_local_model_as_it_does_the_cloud_ones(daemon: DaemonHandle, model_path: Path) -> None:
    """Walk finding: with a second GGUF configured, `locod status`'s local line named only the default (and
    whichever were loaded), where its cloud line names every cloud model."""
    daemon.config_path.write_text(f'[[local.models]]\nname = "mybot"\npath = "{model_path}"\n')
    assert daemon.cli("reload").returncode == 0
    local = next(line for line in daemon.cli("status").stdout.splitlines() if line.strip().startswith("local "))
    assert f"local  {MODEL_NAME}; also mybot (resident: {MODEL_NAME}, " in local, local


def test_the_http_api_says_which_name_serves_a_providers_model_id(daemon_factory: Any) -> None:
    """Walk finding: code written for the provider (`model="gpt-4o-mini"`) pointed at the HTTP door got 404
    "the model 'gpt-4o-mini' does not exist", with the cloud model configured as name "gpt-mini"."""
    cloud = {"name": "gpt-mini", "base_url": "http://127.0.0.1:9/v1", "model": "gpt-4o-mini"}
    port = free_port()
    daemon_factory({"cloud": {"models": [cloud]}}, extra_env={"LOCOD_HTTP": f"127.0.0.1:{port}"})
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", body, {"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 404
    error = json.loads(refused.value.read())["error"]
    assert error["code"] == "model_not_found"
    assert "'gpt-4o-mini' is the endpoint's model id of cloud model 'gpt-mini': name 'gpt-mini'" in error["message"]
