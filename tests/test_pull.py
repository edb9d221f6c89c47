"""`locod models pull`: resumable, checked downloads from a real loopback HTTP server, and a pulled model
that really answers a turn after `locod reload`."""

from __future__ import annotations

import hashlib
import os
import pty
import select
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from locod.daemon.catalog import pulled_models
from locod.daemon.config import Config, load_config
from locod.daemon.gguf import GgufInfo, NotGGUF, describe
from locod.daemon.pull import pull_model
from locod.errors import ConfigError, FetchError, LocodError

from .conftest import locod_command, start_daemon, write_config
from .fileserver import FileServer, Served, gguf_bytes

MB = 1 << 20


@pytest.fixture
def server() -> Iterator[FileServer]:
    fs = FileServer().start()
    yield fs
    fs.stop()


def config_for(models: Path, hub: str = "") -> Config:
    env = {"LOCOD_MODELS_DIR": str(models), "XDG_CONFIG_HOME": str(models / "no-config")}
    return load_config(env={**env, "LOCOD_HUB_ENDPOINT": hub} if hub else env)


def quiet(_: str) -> None:
    pass


def test_a_cut_download_resumes_with_a_range_request(tmp_path: Path, server: FileServer) -> None:
    data = gguf_bytes(3 * MB + 123)
    server.files["m.gguf"] = Served(data, cut_after=MB + 7)
    config = config_for(tmp_path)
    with pytest.raises(FetchError, match=r"interrupted after 1\.0 MiB.*run the same command again to resume"):
        pull_model(config, f"{server.url}/files/m.gguf", progress=quiet)
    partial = tmp_path / ".m.gguf.partial"
    assert [p.name for p in tmp_path.iterdir()] == [partial.name]  # only the resumable part
    assert partial.read_bytes() == data[: MB + 7]

    model = pull_model(config, f"{server.url}/files/m.gguf", progress=quiet)
    assert [s.range for s in server.gets()] == [None, f"bytes={MB + 7}-"]
    assert (tmp_path / "m.gguf").read_bytes() == data
    assert model.sha256 == hashlib.sha256(data).hexdigest()
    assert (model.quantisation, model.context_length, model.n_ctx) == ("Q4_K_M", 8192, 4096)
    assert pulled_models(tmp_path) == [model]
    assert not partial.exists()
    # registered: the config now offers it as a local model
    assert config_for(tmp_path).local_model("m").path == "m.gguf"


def test_the_hubs_published_sha256_is_checked(tmp_path: Path, server: FileServer) -> None:
    data = gguf_bytes(MB)
    server.files["good.gguf"] = Served(data)
    server.files["bad.gguf"] = Served(data, published="ab" * 32)
    config = config_for(tmp_path, hub=server.url)
    with pytest.raises(FetchError, match=f"checksum mismatch .*expected {'ab' * 32}"):
        pull_model(config, "hf://owner/repo/bad.gguf", progress=quiet)
    assert list(tmp_path.iterdir()) == []

    model = pull_model(config, "hf://owner/repo/good.gguf", name="good", progress=quiet)
    assert model.sha256 == hashlib.sha256(data).hexdigest()
    assert ("HEAD", "/owner/repo/resolve/main/good.gguf") in [(s.method, s.path) for s in server.seen]


def test_a_given_sha256_that_contradicts_the_hub_downloads_nothing(tmp_path: Path, server: FileServer) -> None:
    server.files["m.gguf"] = Served(gguf_bytes(MB))
    config = config_for(tmp_path, hub=server.url)
    with pytest.raises(FetchError, match="differs from the hub's published"):
        pull_model(config, "hf://owner/repo/m.gguf", sha256="cd" * 32, progress=quiet)
    assert server.gets() == [] and list(tmp_path.iterdir()) == []


def test_ctx_out_of_range_downloads_nothing(tmp_path: Path, server: FileServer) -> None:
    server.files["m.gguf"] = Served(gguf_bytes(MB))
    with pytest.raises(FetchError, match="--ctx must be between 128 and 1048576, got 64"):
        pull_model(config_for(tmp_path), f"{server.url}/files/m.gguf", n_ctx=64, progress=quiet)
    assert server.gets() == [] and list(tmp_path.iterdir()) == []
    model = pull_model(config_for(tmp_path), f"{server.url}/files/m.gguf", n_ctx=8192, progress=quiet)
    assert config_for(tmp_path).local_model(model.name).n_ctx == 8192


def test_a_wrong_given_sha256_removes_the_download(tmp_path: Path, server: FileServer) -> None:
    server.files["m.gguf"] = Served(gguf_bytes(MB))
    with pytest.raises(FetchError, match="checksum mismatch"):
        pull_model(config_for(tmp_path), f"{server.url}/files/m.gguf", sha256="cd" * 32, progress=quiet)
    assert list(tmp_path.iterdir()) == []


def test_not_a_gguf_is_refused_after_its_first_bytes(tmp_path: Path, server: FileServer) -> None:
    server.files["page.gguf"] = Served(b"<!doctype html><title>Sign in</title>" + b"x" * (4 * MB))
    with pytest.raises(FetchError, match=r"no GGUF file .*doctype"):
        pull_model(config_for(tmp_path), f"{server.url}/files/page.gguf", progress=quiet)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_file_is_a_clear_error(tmp_path: Path, server: FileServer) -> None:
    with pytest.raises(FetchError, match="answered 404"):
        pull_model(config_for(tmp_path, hub=server.url), "hf://owner/repo/none.gguf", progress=quiet)


def test_list_and_rm(tmp_path: Path, server: FileServer) -> None:
    server.files["m.gguf"] = Served(gguf_bytes(MB, context_length=1024, file_type=7))
    env = {**_clean_env(), "LOCOD_MODELS_DIR": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "none")}
    env["LOCOD_RUNTIME_DIR"] = str(tmp_path / "run")
    pull = _run(env, "models", "pull", f"{server.url}/files/m.gguf", "--name", "tiny")
    assert pull.returncode == 0, pull.stderr
    listing = _run(env, "models", "list")
    row = next(line.split() for line in listing.stdout.splitlines() if line.startswith("tiny "))
    assert row == ["tiny", "1", "Q8_0", "1024", "of", "1024", "1", "-", str(tmp_path / "tiny.gguf")]
    assert _run(env, "models", "rm", "tiny").returncode == 0
    assert pulled_models(tmp_path) == [] and not (tmp_path / "tiny.gguf").exists()
    gone = _run(env, "models", "rm", "tiny")
    assert gone.returncode == 1 and "'tiny' was not pulled: no such model" in gone.stderr


def test_names_belong_to_one_model(tmp_path: Path, server: FileServer) -> None:
    server.files["a.gguf"] = Served(gguf_bytes(MB))
    server.files["b.gguf"] = Served(gguf_bytes(MB, file_type=7))
    config = config_for(tmp_path)
    pull_model(config, f"{server.url}/files/a.gguf", name="m", progress=quiet)
    lines: list[str] = []
    pull_model(config_for(tmp_path), f"{server.url}/files/a.gguf", name="m", progress=lines.append)
    assert lines == [f"m: already pulled, at {tmp_path / 'm.gguf'}"] and len(server.gets()) == 1
    with pytest.raises(FetchError, match=r"already pulled .*models rm m"):
        pull_model(config_for(tmp_path), f"{server.url}/files/b.gguf", name="m", progress=quiet)
    with pytest.raises(FetchError, match="'smollm2-135m-instruct' is already a model"):
        pull_model(config_for(tmp_path), f"{server.url}/files/b.gguf", name="smollm2-135m-instruct", progress=quiet)
    (tmp_path / "m.gguf").unlink()  # the same source again, its file lost: downloaded anew
    assert pull_model(config_for(tmp_path), f"{server.url}/files/a.gguf", name="m", progress=quiet).name == "m"
    assert (tmp_path / "m.gguf").is_file() and len(server.gets()) == 2


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LOCOD_")}


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(locod_command(*args), capture_output=True, text=True, env=env, timeout=120)


# -- disk full: a real 1 MiB tmpfs, mounted in a private mount namespace -------------------------------


def _in_small_tmpfs(directory: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run `locod ARGS` with ``directory`` a 1 MiB tmpfs (a user and mount namespace of its own, so no
    root and no mount left behind); prints the directory's entries after the command."""
    script = 'mount -t tmpfs -o size=1m tmpfs "$0" || exit 99; "$@"; rc=$?; echo "entries:" $(ls -A "$0"); exit $rc'
    command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, str(directory)]
    return subprocess.run(command + locod_command(*args), capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture
def tmpfs_env(tmp_path: Path) -> dict[str, str]:
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    if shutil.which("unshare") is None or probe.returncode != 0:
        pytest.skip("needs unshare with user namespaces to mount a small tmpfs")
    (tmp_path / "models").mkdir()
    return {**_clean_env(), "LOCOD_MODELS_DIR": str(tmp_path / "models"), "XDG_CONFIG_HOME": str(tmp_path)}


def test_disk_space_is_checked_before_downloading(tmp_path: Path, server: FileServer, tmpfs_env: dict) -> None:
    server.files["big.gguf"] = Served(gguf_bytes(64 * 1024), claimed_size=4 * MB)
    result = _in_small_tmpfs(tmp_path / "models", tmpfs_env, "models", "pull", f"{server.url}/files/big.gguf")
    assert result.returncode == 1, result.stderr
    assert "not enough disk space" in result.stderr and "needs 4.0 MiB" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.split() == ["entries:"]  # nothing written


def test_a_disk_filling_up_removes_the_part(tmp_path: Path, server: FileServer, tmpfs_env: dict) -> None:
    """Kept, the part would leave the disk full (and a daemon sharing it refusing every turn)."""
    server.files["big.gguf"] = Served(gguf_bytes(64 * 1024), endless=True)  # no size: no pre-check possible
    result = _in_small_tmpfs(tmp_path / "models", tmpfs_env, "models", "pull", f"{server.url}/files/big.gguf")
    assert result.returncode == 1, result.stderr
    assert "the disk filled up after" in result.stderr and "the part was removed" in result.stderr
    assert result.stdout.split() == ["entries:"]


def test_a_download_without_a_size_stops_at_max_size(tmp_path: Path, server: FileServer) -> None:
    server.files["x.gguf"] = Served(gguf_bytes(64 * 1024), endless=True)
    env = {**_clean_env(), "LOCOD_MODELS_DIR": str(tmp_path / "models"), "XDG_CONFIG_HOME": str(tmp_path)}
    result = _run(env, "models", "pull", f"{server.url}/files/x.gguf", "--max-size", "3M")
    assert result.returncode == 1, result.stderr
    assert "passed the 3.0 MiB a model may take (--max-size raises it)" in result.stderr
    assert "the part was removed" in result.stderr and "Traceback" not in result.stderr
    assert os.listdir(tmp_path / "models") == []
    server.files["big.gguf"] = Served(gguf_bytes(4 * MB))  # announced: refused before a byte is written
    result = _run(env, "models", "pull", f"{server.url}/files/big.gguf", "--max-size", "3M")
    assert result.returncode == 1 and "the file is 4.0 MiB, over the 3.0 MiB" in result.stderr
    assert os.listdir(tmp_path / "models") == []
    result = _run(env, "models", "pull", f"{server.url}/files/big.gguf", "--max-size", "lots")
    assert result.returncode == 2 and "argument --max-size: expects a size such as 8G" in result.stderr


def _damaged_headers() -> dict[str, bytes]:
    """GGUF headers a hostile server could send: an array of 2^62 uint64 (seeking past any offset), arrays
    nested 5,000 deep (recursion), an array of 2^40 strings (a loop through the whole file)."""
    start = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"x" + struct.pack("<I", 9)
    return {
        "seek.gguf": start + struct.pack("<IQ", 10, 2**62) + b"\0" * 64,
        "deep.gguf": start + struct.pack("<IQ", 9, 1) * 5000 + struct.pack("<IQ", 4, 0) + b"\0" * 64,
        "strings.gguf": start + struct.pack("<IQ", 8, 2**40) + b"\0" * 4096,
    }


def test_damaged_gguf_headers_are_named_errors_listed_as_damaged(tmp_path: Path) -> None:
    config: dict[str, Any] = {"local": {"models": []}}
    for name, data in _damaged_headers().items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(NotGGUF, match="the GGUF header is damaged") as info:
            describe(path)
        assert str(path) in str(info.value)
        config["local"]["models"].append({"name": name.removesuffix(".gguf"), "path": str(path)})
    write_config(tmp_path / "config.toml", config)
    env = {**_clean_env(), "LOCOD_MODELS_DIR": str(tmp_path / "models")}
    listed = _run(env, "--config", str(tmp_path / "config.toml"), "models", "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.count("damaged GGUF") == 3 and "Traceback" not in listed.stderr


def test_a_pulled_file_with_a_damaged_header_is_refused_and_removed(tmp_path: Path, server: FileServer) -> None:
    env = {**_clean_env(), "LOCOD_MODELS_DIR": str(tmp_path / "models"), "XDG_CONFIG_HOME": str(tmp_path)}
    for name, data in _damaged_headers().items():
        server.files[name] = Served(data)
        result = _run(env, "models", "pull", f"{server.url}/files/{name}")
        assert result.returncode == 1, result.stderr
        assert "the download is not a GGUF model file; it was removed" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert os.listdir(tmp_path / "models") == []


# -- a pulled model answers ---------------------------------------------------------------------------


def test_a_pulled_model_answers_a_turn_after_reload(
    tmp_path: Path, server: FileServer, models_dir: Path, model_path: Path
) -> None:
    """The embedded GGUF, served over loopback, pulled as `mine`: after `locod reload` a request can name
    it, and with `local.default = "mine"` a turn forced local runs on it."""
    server.files[model_path.name] = Served(model_path.read_bytes())
    own = tmp_path / "models"
    own.mkdir()
    os.link(model_path, own / model_path.name)  # the embedded default the daemon starts with
    daemon = start_daemon(tmp_path / "home", own)
    try:
        client = daemon.client()
        with pytest.raises(LocodError, match="model named 'mine'"):
            client.ask("Hi", model="mine", max_tokens=4)
        pull = _run(daemon.env, "--config", str(daemon.config_path), "models", "pull",
                    f"{server.url}/files/{model_path.name}", "--name", "mine")  # fmt: skip
        assert pull.returncode == 0, pull.stderr
        assert client.reload()["reloaded"] is True
        answer = client.ask("Say hello.", model="mine", max_tokens=8, seed=1)
        assert answer.done.model == "mine" and answer.done.outcome == "ok" and answer.text.strip()

        listing = _run(daemon.env, "--config", str(daemon.config_path), "models", "list").stdout
        assert any(line.split()[:3] == ["mine", "94", "Q4_1"] and " yes " in line for line in listing.splitlines())

        write_config(daemon.config_path, {"local": {"default": "mine"}})
        assert client.reload()["reloaded"] is True
        assert client.ask("Say hi.", force="local", max_tokens=8, seed=1).done.model == "mine"
        assert [r["model"] for r in daemon.rows("SELECT model FROM decisions WHERE outcome = 'ok'")] == ["mine"] * 2
    finally:
        daemon.stop()


def test_the_hub_endpoint_follows_hf_endpoint_unless_configured(tmp_path: Path) -> None:
    base = {"LOCOD_MODELS_DIR": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "none")}
    assert load_config(env=base).local.hub_endpoint == "https://huggingface.co"
    assert load_config(env={**base, "HF_ENDPOINT": "http://mirror:8080/"}).local.hub_endpoint == "http://mirror:8080"
    mine = {**base, "HF_ENDPOINT": "http://mirror:8080", "LOCOD_HUB_ENDPOINT": "https://hub.example"}
    assert load_config(env=mine).local.hub_endpoint == "https://hub.example"
    with pytest.raises(ConfigError, match=r"local\.hub_endpoint must be an http"):
        load_config(env={**base, "LOCOD_HUB_ENDPOINT": "ftp://hub"})


def test_a_damaged_user_manifest_names_file_and_key(tmp_path: Path) -> None:
    entry = 'name = "x"\nfile = "x.gguf"\nsize = 1\nsha256 = ""\norigin = ""\nquantisation = ""\ncontext_length = 0\n'
    (tmp_path / "pulled.toml").write_text(f"[[model]]\n{entry}")
    with pytest.raises(ConfigError, match=r"pulled\.toml: model\[0\]\.n_ctx is required"):
        config_for(tmp_path)
    (tmp_path / "pulled.toml").write_text(f'[[model]]\n{entry}n_ctx = "big"\n')
    with pytest.raises(ConfigError, match=r"pulled\.toml: model\[0\]\.n_ctx expects an integer"):
        config_for(tmp_path)


def test_the_gguf_header_of_the_embedded_model(model_path: Path, tmp_path: Path) -> None:
    """Read without llama.cpp; a header cut short is NotGGUF (CutShort), not a crash."""
    assert describe(model_path) == GgufInfo(8192, "Q4_1")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(model_path.read_bytes()[:300])
    with pytest.raises(NotGGUF, match="is cut short: 300 bytes, ending within its GGUF header"):
        describe(cut)


def test_rm_of_the_built_in_model_says_what_it_is(tmp_path: Path) -> None:
    from locod.daemon.pull import remove_model

    with pytest.raises(FetchError, match="built-in default model") as info:
        remove_model(config_for(tmp_path), "smollm2-135m-instruct")
    assert "(defaults)" not in info.value.message


def _pull_without_tqdm(env: dict[str, str], url: str, stderr: int) -> subprocess.Popen[bytes]:
    """`locod models pull` on an install without tqdm: its import made to fail the standard way (a None
    entry in sys.modules), as on a quickstart install without the pull extra."""
    blocked = "import sys; sys.modules['tqdm'] = None; from locod.cli import main; sys.exit(main(sys.argv[1:]))"
    command = [sys.executable, "-c", blocked, "models", "pull", url]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env)


def test_a_missing_progress_bar_never_stops_a_pull(tmp_path: Path, server: FileServer) -> None:
    server.files["a.gguf"] = Served(gguf_bytes(3 * MB))
    server.files["b.gguf"] = Served(gguf_bytes(3 * MB))
    env = {**_clean_env(), "LOCOD_MODELS_DIR": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "none")}
    piped = _pull_without_tqdm(env, f"{server.url}/files/a.gguf", subprocess.PIPE)
    _, err = piped.communicate(timeout=120)
    assert piped.returncode == 0 and b"MiB of" not in err, err  # off a terminal: no progress lines
    # on a terminal (a real pseudo-terminal): plain progress lines instead of the bar
    main, sub = pty.openpty()
    on_tty = _pull_without_tqdm(env, f"{server.url}/files/b.gguf", sub)
    os.close(sub)
    seen = b""
    for _ in range(1000):  # until the pull closes its end of the terminal
        try:
            chunk = os.read(main, 4096) if select.select([main], [], [], 60)[0] else b""
        except OSError:  # EIO: the other end is closed
            break
        if not chunk:
            break
        seen += chunk
    os.close(main)
    assert on_tty.wait(120) == 0, seen
    assert b"MiB of 3.0 MiB (" in seen and b"Traceback" not in seen, seen
    assert {m.name for m in pulled_models(tmp_path)} == {"a", "b"}
