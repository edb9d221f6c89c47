"""The fourteenth walk: an operator of a small device (a Jetson Orin Nano, an old 4 GB laptop) who runs several
local GGUFs within a memory budget, as a service. Every test runs the real `locod` command or a real daemon
with the embedded model, copied under other names and settings as the operator's other models."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import pytest

from .conftest import locod_command, wait_for, write_config
from .fileserver import FileServer, Served, gguf_bytes


def household(model_path: Path, budget_mb: int, **extra: Any) -> dict[str, Any]:
    """A tiny chat model as the default and a long-context one for harder turns, both the embedded GGUF:
    its weights take 94 MB, its KV cache 22 MB at 1,024 tokens and 90 MB at 4,096."""
    models = [
        {"name": "tiny", "path": str(model_path), "n_ctx": 1024},
        {"name": "big", "path": str(model_path), "n_ctx": 4096, **extra},
    ]
    return {"local": {"default": "tiny", "memory_budget_mb": budget_mb, "n_threads": 2, "models": models}}


def test_the_memory_budget_counts_a_models_kv_cache_before_loading_it(daemon_factory: Any, model_path: Path) -> None:
    """With 250 MB for two models of 116 and 184 MB, `--model big` after `tiny` kept both loaded (300 MB): the
    room made before a load counted the file's size alone, not the KV cache of its n_ctx, so the budget a
    4 GB device was sized by was overrun by every long-context model. `locod status` named the resident
    models without their memory, so nothing showed it; and a model that alone outgrew the budget was loaded
    without a word. Now the KV cache is counted from the file's header first, status says how much of the
    budget is in use, and a model over the budget by itself is named in the log. The dialogue cache sized
    itself (`cache_mb = -1`) at 180 MB beside them, more than the budget could ever leave it; now within it."""
    handle = daemon_factory(household(model_path, 250))
    for model in ("tiny", "big"):
        asked = handle.cli("ask", "Hi", "--model", model, "--max-tokens", "2")
        assert asked.returncode == 0, asked.stderr
    local = handle.client().status()["local"]
    assert local["resident"] == ["big"], local
    assert 180 <= local["resident_mb"] <= local["memory_budget_mb"] == 250, local
    # What big leaves the cache now (it was sized beside tiny, loaded first, and said 250 - 116 after big came).
    assert local["cache"]["limit_mb"] == pytest.approx(250 - local["resident_mb"], abs=1), local
    shown = handle.cli("status")
    assert "(resident: big, 184 of 250 MiB;" in shown.stdout, shown.stdout
    assert "unloaded local model tiny to stay within 250 MiB" in handle.log()
    listed = handle.cli("models", "list").stdout  # what each takes, to plan the budget before loading any
    assert "1024 of 8192  116         no " in listed and "4096 of 8192  184         yes " in listed, listed
    header = ["name", "size", "MiB", "quant", "context", "memory", "MiB", "loaded", "path"]
    assert listed.splitlines()[0].split() == header, listed
    assert "counted against local.memory_budget_mb (250 MiB)" in listed
    assert [row["memory_mb"] > 180 for row in json.loads(handle.cli("models", "list", "--json").stdout)] == [
        False,
        False,
        True,
    ]

    write_config(handle.config_path, household(model_path, 100))
    assert handle.cli("reload").returncode == 0
    for model in ("tiny", "big", "tiny"):  # each over 100 MB alone: loaded in turn, said once each
        asked = handle.cli("ask", "Hi", "--model", model, "--max-tokens", "2")
        assert asked.returncode == 0, asked.stderr
    assert handle.client().status()["local"]["resident"] == ["tiny"]
    over = (
        "local model tiny takes about 116 MiB (weights and a 1024-token KV cache), more than "
        "local.memory_budget_mb (100 MiB): it runs alone, over the budget"
    )
    assert handle.log().count(over) == 1, handle.log()
    assert handle.log().count("INFO locod.daemon.local: loaded local model tiny") == 3


@pytest.mark.skipif(llama_cpp.llama_supports_gpu_offload(), reason="this llama-cpp-python build offloads to a GPU")
def test_n_gpu_layers_on_a_cpu_only_build_is_said_once(daemon_factory: Any, model_path: Path) -> None:
    """`n_gpu_layers = -1` for the Jetson's GPU, with llama-cpp-python installed from PyPI (a CPU-only build
    unless compiled with CUDA): the model ran on the CPU, at a fraction of the expected speed, and nothing in
    the log or status said the setting did nothing. Now the load says so, once per model, however often the
    budget unloads and reloads it."""
    handle = daemon_factory(household(model_path, 200, n_gpu_layers=-1))
    for model in ("big", "tiny", "big"):  # 200 MB holds one of them: big is loaded twice
        asked = handle.cli("ask", "Hi", "--model", model, "--max-tokens", "2")
        assert asked.returncode == 0, asked.stderr
    said = "local model big: n_gpu_layers = -1, but this llama-cpp-python build has no GPU offload: it runs on the CPU"
    assert handle.log().count(said) == 1, handle.log()
    assert handle.log().count("INFO locod.daemon.local: loaded local model big") == 2
    assert "local model tiny: n_gpu_layers" not in handle.log()


def test_status_sets_apart_a_configured_model_whose_file_is_missing(
    daemon_factory: Any, model_path: Path, tmp_path: Path
) -> None:
    """A second model's GGUF not copied to the device yet (or the embedded one never fetched into a new models
    directory): `locod status`, the one place to check health, listed it among the models on offer ("also
    coder"), while routing left it out and `--model coder` was refused; and with the default's file moved
    away under the running daemon, status said nothing while the turns routed to it failed. Now status names
    both apart."""
    tiny = tmp_path / "tiny.gguf"
    shutil.copyfile(model_path, tiny)
    config = household(model_path, 1024)
    config["local"]["models"][0]["path"] = str(tiny)
    config["local"]["models"].append({"name": "coder", "path": str(model_path.parent / "not-copied-yet.gguf")})
    handle = daemon_factory(config)
    local = handle.client().status()["local"]
    assert local["unavailable"] == {"coder": "model_missing"}, local
    line = next(row for row in handle.cli("status").stdout.splitlines() if row.strip().startswith("local"))
    assert "; also smollm2-135m-instruct, big (resident: tiny" in line, line
    assert "left out, no usable file (`locod models list`): coder;" in line, line
    tiny.rename(tmp_path / "tiny.gguf.moved")
    assert handle.client().status()["local"]["unavailable"] == {"coder": "model_missing", "tiny": "model_missing"}
    line = next(row for row in handle.cli("status").stdout.splitlines() if row.strip().startswith("local"))
    assert "; the default's file is not usable (model_missing): its turns fail until it is back;" in line, line


@pytest.fixture
def server() -> Iterator[FileServer]:
    fs = FileServer().start()
    yield fs
    fs.stop()


def test_models_commands_use_the_running_daemons_models_directory(
    daemon_factory: Any, model_path: Path, tmp_path: Path, server: FileServer
) -> None:
    """The system service keeps its models in /var/lib/locod/models (its unit sets LOCOD_MODELS_DIR), while
    `sudo locod models pull URL` from a shell resolved the models directory from the shell's environment:
    the file went into ~/.local/share/locod/models, the pull said to `locod reload`, and the reloaded
    service never offered the model; `locod models list` showed the shell's directory, not the service's.
    Now the models commands use the directory of the daemon that runs."""
    service_models = tmp_path / "var-lib-locod-models"
    service_models.mkdir()
    handle = daemon_factory(household(model_path, 1024), extra_env={"LOCOD_MODELS_DIR": str(service_models)})
    shell = {k: v for k, v in handle.env.items() if k != "LOCOD_MODELS_DIR"}
    shell["XDG_DATA_HOME"] = str(tmp_path / "shell-data")
    server.files["helper.gguf"] = Served(gguf_bytes(1 << 20, context_length=2048))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = locod_command("--config", str(handle.config_path), *args)
        return subprocess.run(command, capture_output=True, text=True, env=shell, timeout=120)

    pulled = cli("models", "pull", f"{server.url}/files/helper.gguf", "--name", "helper")
    assert pulled.returncode == 0, pulled.stderr
    assert (service_models / "helper.gguf").is_file() and (service_models / "pulled.toml").is_file()
    assert (
        "(Q4_K_M, context 2048 of 2048; it takes about 1 MiB in memory with its KV cache at that context)"
        in pulled.stderr
    )
    assert not (tmp_path / "shell-data" / "locod").exists()
    assert cli("reload").returncode == 0
    assert "helper" in handle.client().status()["local"]["models"]
    listed = cli("models", "list")
    assert f"{service_models / 'helper.gguf'}" in listed.stdout, listed.stdout
    removed = cli("models", "rm", "helper")
    assert removed.returncode == 0, removed.stderr
    assert not (service_models / "helper.gguf").exists()


REPO = Path(__file__).resolve().parent.parent
# A stand-in for the venv's python: it logs each call and answers install.sh's questions about llama.cpp; a
# rebuild given CMAKE_ARGS makes it offload when $BUILDS_CUDA says the toolkit is there.
FAKE_PYTHON = """#!/bin/sh
echo "$* CMAKE_ARGS=${CMAKE_ARGS:-}" >> "$CALLS"
case "$*" in
  *llama_supports_gpu_offload*) [ -f "$OFFLOADS" ]; exit $? ;;
  *__version__*) echo 0.3.36 ;;
  *"llama-cpp-python=="*) [ -n "${CMAKE_ARGS:-}" ] && [ -n "${BUILDS_CUDA:-}" ] && touch "$OFFLOADS" ;;
esac
exit 0
"""


def test_install_with_gpu_builds_llama_cpp_with_cuda(tmp_path: Path) -> None:
    """`scripts/install.sh --gpu jetson` (or `--user --gpu nvidia`) opened the GPU's device nodes to the
    service and installed llama-cpp-python as PyPI builds it from source: for the CPU alone. Every model's
    `n_gpu_layers = -1` then did nothing, and the Jetson answered at CPU speed. Now --gpu rebuilds
    llama-cpp-python with CUDA unless the installed build already offloads, and stops when it still cannot."""
    home, data = tmp_path / "home", tmp_path / "data"
    venv = data / "locod" / "venv"
    (venv / "bin").mkdir(parents=True)
    locod = '#!/bin/sh\n[ "$1" = status ] && exit 5\necho "locod 0.1.0"\n'  # status: no daemon answers
    for name, body in (("python", FAKE_PYTHON), ("locod", locod)):
        (venv / "bin" / name).write_text(body)
        (venv / "bin" / name).chmod(0o755)
    calls, offloads = tmp_path / "calls", tmp_path / "offloads"
    env = {"HOME": str(home), "XDG_DATA_HOME": str(data), "XDG_CONFIG_HOME": str(home / ".config")}
    env.update(PATH="/usr/bin:/bin", CALLS=str(calls), OFFLOADS=str(offloads))

    def install(**extra: str) -> subprocess.CompletedProcess[str]:
        command = ["bash", str(REPO / "scripts/install.sh"), "--user", "--gpu", "nvidia"]
        return subprocess.run(command, capture_output=True, text=True, env={**env, **extra}, timeout=60)

    no_toolkit = install()
    assert no_toolkit.returncode == 1
    assert (
        "llama-cpp-python 0.3.36 still has no GPU offload: is the CUDA toolkit (nvcc) installed?" in no_toolkit.stderr
    )
    built = install(BUILDS_CUDA="1")
    assert built.returncode == 0, built.stderr
    assert "building llama-cpp-python 0.3.36 with CUDA for the GPU (CMAKE_ARGS=-DGGML_CUDA=on)" in built.stderr
    rebuild = (  # from source: a wheel from the cache or an index would be the CPU build again
        "-m pip install --quiet --force-reinstall --no-cache-dir --no-deps --no-binary llama-cpp-python "
        "llama-cpp-python==0.3.36"
    )
    assert f"{rebuild} CMAKE_ARGS=-DGGML_CUDA=on" in calls.read_text()
    calls.unlink()
    upgraded = install(BUILDS_CUDA="1")  # an upgrade keeps the build that offloads
    assert upgraded.returncode == 0 and "building" not in upgraded.stderr, upgraded.stderr
    assert rebuild not in calls.read_text()


def test_a_model_file_replaced_under_a_loaded_model_is_read_again_at_a_reload(
    daemon_factory: Any, model_path: Path, tmp_path: Path
) -> None:
    """The operator copied a new build of the coder model over its file and ran `locod reload`: `locod models
    list` showed the new file, loaded, while the daemon answered on with the old weights it had read into
    memory, until a restart (the learner meanwhile reset the model's predictor for the new file). Now the
    reload has a loaded model whose file was replaced read again before its next turn."""
    coder = tmp_path / "coder.gguf"
    coder.write_bytes(model_path.read_bytes())
    config = {"local": {"default": "coder", "models": [{"name": "coder", "path": str(coder), "n_ctx": 512}]}}
    handle = daemon_factory(config)
    loads = "INFO locod.daemon.local: loaded local model coder"
    assert handle.log().count(loads) == 1
    assert handle.cli("reload").returncode == 0  # the same file: kept loaded
    assert handle.cli("ask", "Hi", "--model", "coder", "--max-tokens", "2").returncode == 0
    assert handle.log().count(loads) == 1
    newer = tmp_path / "coder.gguf.new"
    newer.write_bytes(model_path.read_bytes() + bytes(1 << 20))  # another build: a larger file
    newer.replace(coder)
    assert handle.cli("reload").returncode == 0
    asked = handle.cli("ask", "Hi", "--model", "coder", "--max-tokens", "2")
    assert asked.returncode == 0, asked.stderr
    assert "unloaded local model coder: its file was replaced" in handle.log()
    assert handle.log().count(loads) == 2


@pytest.mark.skipif(importlib.util.find_spec("pynvml") is not None, reason="nvidia-ml-py, the gpu extra, is installed")
def test_a_gpu_without_the_gpu_extra_is_not_reported_as_no_device(daemon_factory: Any, tmp_path: Path) -> None:
    """A laptop with an NVIDIA GPU and its driver, locod installed without the gpu extra: status's `missing`
    said "no Jetson GPU load file and no NVML device", which is untrue and hides the one-line fix. Now it
    names the extra when the driver is loaded, and says "no NVML device" only when there is none."""
    fixtures = Path(__file__).parent / "fixtures/telemetry/desktop"
    proc = tmp_path / "proc"
    shutil.copytree(fixtures / "proc", proc)
    (proc / "driver/nvidia").mkdir(parents=True)
    (proc / "driver/nvidia/version").write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14\n")
    roots = {"sysfs_root": str(fixtures / "sys"), "procfs_root": str(proc)}
    handle = daemon_factory({"telemetry": roots})
    why = handle.client().status()["telemetry"]["missing"]["gpu_pct"]
    assert why == "no Jetson GPU load file, and nvidia-ml-py, the gpu extra, is not installed (pip install '.[gpu]')"
    (proc / "driver/nvidia/version").unlink()
    bare = daemon_factory({"telemetry": roots}, name="bare")
    assert bare.client().status()["telemetry"]["missing"]["gpu_pct"] == "no Jetson GPU load file, and no NVML device"


def test_a_reload_does_not_repeat_each_models_prior_in_the_log(daemon_factory: Any, model_path: Path) -> None:
    """A normal day's log, three models and a cron'd `systemctl reload` after each config edit: every reload
    logged "MESS+ predictor for X starts from the prior ..." again for each model without labels yet (most
    of them, for a household that seldom labels), the same lines each time; and status's learning row
    repeated the same clause for each copy of one GGUF. Now the start says it, and a reload only when a
    model's prior changed; status says it once for the models alike."""
    handle = daemon_factory(household(model_path, 1024))
    said = "starts from the prior fitted on"
    at_start = handle.log().count(said)
    assert at_start == 3, handle.log()  # the embedded model, tiny and big: one GGUF, whose prior is shipped
    for _ in range(2):
        reloaded = handle.cli("reload")
        assert reloaded.returncode == 0, reloaded.stderr
    assert handle.log().count("configuration reloaded from") == 2
    assert handle.log().count(said) == at_start, handle.log()
    learning = next(row for row in handle.cli("status").stdout.splitlines() if row.strip().startswith("learning"))
    assert learning.count("from the prior shipped for its GGUF") == 1, learning  # one clause for the three
    assert "learning  smollm2-135m-instruct, tiny, big from the prior shipped for its GGUF, fitted on " in learning


def test_systemds_status_line_names_the_loaded_model_not_only_the_default(
    daemon_factory: Any, model_path: Path, tmp_path: Path
) -> None:
    """`systemctl status locod` showed "model tiny" while the budget had unloaded tiny for big: the line named
    the default, as if it were what the daemon held. Now it says which models are loaded when that is not
    the default alone."""
    from .test_systemd import NotifyListener

    notify = NotifyListener(tmp_path / "notify.sock")
    try:
        handle = daemon_factory(household(model_path, 250), extra_env={"NOTIFY_SOCKET": str(notify.path)})
        wait_for(lambda: "READY=1" in notify.fields(), 60, "READY=1")
        assert next(f for f in notify.fields() if f.startswith("STATUS=")).startswith("STATUS=model tiny, ")
        asked = handle.cli("ask", "Hi", "--model", "big", "--max-tokens", "2")
        assert asked.returncode == 0, asked.stderr
        wait_for(
            lambda: any(f.startswith("STATUS=model tiny (default; loaded: big), ") for f in notify.fields()),
            60,
            "the STATUS line after the switch",
        )
    finally:
        notify.close()


def test_reload_says_what_changed_in_the_local_models(daemon_factory: Any, model_path: Path) -> None:
    """After editing three [[local.models]] entries (one renamed, one added, one's context cut), `locod reload`
    printed "reloaded from ..." and the journal "configuration reloaded": nothing told the operator whether
    the daemon took the edit as meant (a renamed entry is a model removed and another added). Now both say
    what changed, model by model."""
    handle = daemon_factory(household(model_path, 1024))
    edited = household(model_path, 1024)
    edited["local"]["models"][0]["n_ctx"] = 512
    edited["local"]["models"][1]["name"] = "big2"
    edited["local"]["models"].append({"name": "coder", "path": str(model_path), "n_gpu_layers": 0})
    write_config(handle.config_path, edited)
    reloaded = handle.cli("reload")
    assert reloaded.returncode == 0, reloaded.stderr
    said = "added big2; added coder; removed big; changed tiny (n_ctx)"
    assert f"local models: {said}\n" in reloaded.stdout, reloaded.stdout
    assert f"reload: local models {said}" in handle.log()
    again = handle.cli("reload")
    assert again.returncode == 0 and "local models" not in again.stdout, again.stdout


def test_an_n_ctx_beyond_the_trained_context_is_said(daemon_factory: Any, model_path: Path) -> None:
    """The long-context entry set `n_ctx = 16384` on a model trained for 8,192 tokens (the operator copied the
    setting from another model's): llama.cpp loaded it without a word (its own warning is silenced), and past
    8,192 tokens the answers fell apart. `locod models list` showed "16384 of 8192", but nothing pointed
    there. Now the load says so in the log, once."""
    config = household(model_path, 300)  # big takes 296 MB at 9,216 tokens: it and tiny take turns loading
    config["local"]["models"][1]["n_ctx"] = 9216
    handle = daemon_factory(config)
    for _ in range(2):
        for model in ("big", "tiny"):
            asked = handle.cli("ask", "Hi", "--model", model, "--max-tokens", "2")
            assert asked.returncode == 0, asked.stderr
    said = "local model big: n_ctx = 9216 is beyond the 8192 tokens it was trained for"
    assert handle.log().count(said) == 1, handle.log()
    assert "local model tiny: n_ctx" not in handle.log()
    assert handle.log().count("INFO locod.daemon.local: loaded local model big") == 2
