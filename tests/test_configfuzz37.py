"""Every config key, swept with wrong values of each kind: refused in one line naming the file (or variable),
the key and what was expected, by the validator, by `locod serve` and by a reload, which keeps the old config.

The keys are read from daemon/config.py's dataclasses, so a key added there is swept without a change here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from locod.daemon.config import ENV_OVERRIDES, PATH_KEYS, Config, load_config
from locod.daemon.typed_toml import NOT_A_KEY
from locod.errors import ConfigError

from .conftest import DaemonHandle, locod_command, toml_value, write_config

# One entry of each model list that loads, to hold the swept key of a [[...models]] table.
ENTRIES: dict[str, dict[str, Any]] = {
    "local.models": {"name": "lm", "path": "/nonexistent/lm.gguf"},
    "cloud.models": {"name": "cm", "base_url": "http://127.0.0.1:9/v1", "model": "m"},
}
SECRET = "sk-live-9f8e7d6c5b4a39281706f5e4d3c2b1a0"
CLOUD = '[[cloud.models]]\nname = "c"\nbase_url = "http://127.0.0.1:9/v1"\nmodel = "m"\n'


@dataclasses.dataclass(frozen=True)
class Key:
    dotted: str  # as an error names it: local.models[0].n_ctx
    hint: Any
    meta: Any

    @property
    def section(self) -> str:
        return self.dotted.rpartition(".")[0]

    @property
    def name(self) -> str:
        return self.dotted.rpartition(".")[2]


def schema_keys(cls: Any = Config, prefix: str = "") -> Iterator[Key]:
    """Every leaf key of the schema; a list of tables is entered through its first entry."""
    hints = typing.get_type_hints(cls)
    for fld in dataclasses.fields(cls):
        if fld.name == NOT_A_KEY:
            continue
        hint = hints[fld.name]
        item = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
        if dataclasses.is_dataclass(hint):
            yield from schema_keys(hint, f"{prefix}{fld.name}.")
        elif dataclasses.is_dataclass(item):
            yield from schema_keys(item, f"{prefix}{fld.name}[0].")
        else:
            yield Key(prefix + fld.name, hint, fld.metadata)


def base_type(hint: Any) -> Any:
    """``str | None`` is ``str``: an optional is set as its type is."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is not list and args else hint


def wrong_values(key: Key) -> list[Any]:
    """Values of the wrong kind for ``key``, each of which the validator must refuse."""
    kind = base_type(key.hint)
    wrong_type: dict[Any, list[Any]] = {
        int: ["12", 1.5, [1], {"a": 1}, True, math.inf, math.nan],
        float: ["0.5", [1.0], {"a": 1}, True, math.inf, -math.inf, math.nan],
        bool: ["true", 1, 0, [True], {"a": 1}],
        str: [1, 1.5, [""], {"a": 1}, True, "a\0b"],
        list[str]: ["/a", 1, [1], [{"a": 1}], {"a": 1}],
    }
    values = list(wrong_type[kind])
    lo, hi = key.meta.get("min"), key.meta.get("max")
    if lo is not None:
        values += [lo - 1, -1e308] if kind is float else [lo - 1, -(10**30)]
    if hi is not None:
        values += [hi * 2 + 1, 1e308] if kind is float else [hi + 1, 10**30]
    if key.meta.get("choices"):
        values += ["", "nosuch"]
    return values


def toml_text(key: Key, value: Any) -> str:
    """A config file setting ``key`` to ``value`` (in a model entry that is otherwise valid)."""
    if "[0]" in key.dotted:
        table = key.dotted.partition("[0]")[0]
        entry = {**ENTRIES[table], key.name: value}
        return f"[[{table}]]\n" + "".join(f"{k} = {inline(v)}\n" for k, v in entry.items())
    return f"[{key.section}]\n{key.name} = {inline(value)}\n"


def inline(value: Any) -> str:
    """``value`` in TOML, tables and the non-finite floats included."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {inline(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(inline(v) for v in value) + "]"
    return toml_value(value)


def clean_env(tmp_path: Path) -> dict[str, str]:
    """No LOCOD_* variable, and the XDG places under ``tmp_path``: only the swept file speaks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCOD_")}
    env.update({f"XDG_{d}_HOME": str(tmp_path / d.lower()) for d in ("CONFIG", "STATE", "DATA")})
    env["XDG_RUNTIME_DIR"] = str(tmp_path / "run")
    return env


def refusal(path: Path, env: dict[str, str]) -> str:
    """The one-line message ``load_config`` refuses ``path`` with; any other exception fails the test."""
    with pytest.raises(ConfigError) as refused:
        load_config(path, env=env)
    message = str(refused.value)
    assert "\n" not in message, message
    return message


KEYS = list(schema_keys())
ENV_NAMES = {dotted: variable for variable, dotted in ENV_OVERRIDES.items()}


def test_the_sweep_sees_every_section_and_the_model_tables() -> None:
    sections = {key.dotted.split(".")[0] for key in KEYS}
    assert sections == {f.name for f in dataclasses.fields(Config) if f.name != NOT_A_KEY}
    assert {"local.models[0].n_ctx", "cloud.models[0].api_key_env", "http.cors_origins"} <= {k.dotted for k in KEYS}


@pytest.mark.parametrize("key", KEYS, ids=lambda key: key.dotted)
def test_every_key_refuses_each_wrong_value_naming_the_file_and_the_key(key: Key, tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    path = tmp_path / "config.toml"
    for value in wrong_values(key):
        path.write_text(toml_text(key, value))
        message = refusal(path, env)
        said = message.removeprefix(f"{path}: {key.dotted}")
        assert said != message and said.lstrip("[0123456789]").startswith((" expects", " must")), (value, message)


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("[routng]\nsla = 0.5\n", "unknown key 'routng' (did you mean 'routing'? known here: attachments, cloud"),
        ("[routing]\nslaa = 0.5\n", "unknown key 'routing.slaa' (did you mean 'sla'? known here: "),
        ("[routing]\nsla = 0.5\n[routing]\nmode = 'local'\n", "not valid TOML: Cannot declare ('routing',) twice"),
        ("[routing]\nsla = 0.5\nsla = 0.6\n", "not valid TOML: Cannot overwrite a value"),
        ("routing = 5\n", "[routing] must be a table, got int"),
        ("[local]\nmodels = {name = 'x'}\n", "local.models expects a list of tables, got dict"),
        ("[routing]\nmode = auto\n", "not valid TOML: Invalid value"),
        ("[routing]\nsla = 0.5", ""),  # valid, for the pattern: each above differs from it by one mistake
    ],
)
def test_unknown_keys_misspelt_sections_and_duplicate_tables_are_refused_in_one_line(
    text: str, said: str, tmp_path: Path
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    if not said:
        assert load_config(path, env=clean_env(tmp_path)).routing.sla == 0.5
        return
    assert refusal(path, clean_env(tmp_path)).startswith(f"{path}: "), said
    assert said in refusal(path, clean_env(tmp_path))


@pytest.mark.parametrize("dotted", PATH_KEYS)
def test_a_relative_path_is_refused_and_a_home_one_expanded_for_every_path_key(dotted: str, tmp_path: Path) -> None:
    """routing.policy_path and the telemetry roots were taken as written: ``~/policy.onnx`` was looked for
    in a folder named ``~`` under the daemon's working directory, and routing ran on MESS+ alone with an
    error in the log only; ``sysfs_root = "sys-copy"`` read no battery, and said nothing."""
    section, name = dotted.split(".")
    path = tmp_path / "config.toml"
    path.write_text(f'[{section}]\n{name} = "relative/dir"\n')
    message = refusal(path, clean_env(tmp_path))
    assert message.startswith(f"{path}: {dotted} must be an absolute path or begin with ~/, got 'relative/dir'")
    path.write_text(f'[{section}]\n{name} = "~/there"\n')
    config = load_config(path, env=clean_env(tmp_path))
    assert getattr(getattr(config, section), name) == os.path.join(Path.home(), "there")


@pytest.mark.parametrize("table", sorted(ENTRIES))
@pytest.mark.parametrize("name", ["", "   "])
def test_a_model_with_an_empty_name_is_refused(table: str, name: str, tmp_path: Path) -> None:
    """An empty name was served: "serving on ... with local model " and nothing after it, a model that no
    client, --model or default could name but as the empty string."""
    path = tmp_path / "config.toml"
    entry = {**ENTRIES[table], "name": name}
    path.write_text(f"[[{table}]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in entry.items()))
    message = refusal(path, clean_env(tmp_path))
    assert message.startswith(f"{path}: {table}[0].name must not be empty"), message


def bad_text(variable: str, dotted: str) -> str:
    """A wrong value for ``variable``, by its key's kind: a word for a number, a relative path, a URL
    without its scheme, a model no one configured."""
    key = next(k for k in KEYS if k.dotted == dotted)
    kind = base_type(key.hint)
    if kind in (int, float):
        return "lots" if key.meta.get("max") is None else str(key.meta["max"] * 2 + 1)
    if kind is bool or key.meta.get("choices"):
        return "maybe"
    if dotted in PATH_KEYS:
        return "relative/dir"
    by_key = {
        "daemon.tcp": "127.0.0.1:5557",  # no tcp://
        "http.listen": "http://127.0.0.1:8080",
        "local.hub_endpoint": "huggingface.co",
        "local.default": "ghost",
        "cloud.default": "ghost",
    }
    return by_key[dotted]  # a KeyError here: a new string variable, give it a wrong value above


@pytest.mark.parametrize(("variable", "dotted"), sorted(ENV_OVERRIDES.items()))
def test_each_environment_override_with_a_bad_value_is_refused_naming_the_variable(
    variable: str, dotted: str, tmp_path: Path
) -> None:
    path = tmp_path / "config.toml"
    path.write_text("")
    text = bad_text(variable, dotted)
    with pytest.raises(ConfigError) as refused:
        load_config(path, env={**clean_env(tmp_path), variable: text})
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"${variable}: {dotted} "), message


@pytest.mark.parametrize(
    ("dotted", "text"),
    [
        ("http.listen", "127.0.0.1:\u00b2"),  # str.isdigit() takes a superscript two, which int() refuses
        ("http.listen", "127.0.0.1:\u0668\u0660\u0668\u0660"),  # 8080 in Arabic-Indic digits
        ("daemon.tcp", "tcp://127.0.0.1:99999"),
        ("daemon.tcp", "tcp://127.0.0.1:abc"),
        ("daemon.tcp", "tcp://127.0.0.1:*"),
        ("daemon.tcp", "tcp://127.0.0.1:0"),
    ],
)
def test_an_address_whose_port_is_no_port_is_refused_before_a_model_is_loaded(
    dotted: str, text: str, tmp_path: Path
) -> None:
    """http.listen's superscript port raised ValueError, a traceback; daemon.tcp's port was not checked:
    ZeroMQ took 99999, the daemon saying it served there, and refused abc only after the model was loaded,
    as a port another program might hold."""
    with pytest.raises(ConfigError) as refused:
        load_config(env={**clean_env(tmp_path), ENV_NAMES[dotted]: text})
    assert str(refused.value).startswith(f"${ENV_NAMES[dotted]}: {dotted} must look like "), refused.value


@pytest.mark.parametrize(
    "text",
    [
        CLOUD + f'api_key_env = "{SECRET}"\n',
        CLOUD + f'api_key_file = "{SECRET}"\n',
        f'[http]\napi_key_file = "{SECRET}"\n',
        f'[daemon]\ntcp_secret_file = "{SECRET}"\n',
        CLOUD + f'api_key = "{SECRET}"\n',
        CLOUD + f"api_key = {SECRET}\n",
        f'[[cloud.models]]\nname = "c"\nbase_url = "https://user:{SECRET}@api.example.com:99999/v1"\nmodel = "m"\n',
    ],
    ids=["api_key_env", "api_key_file", "http_key_file", "tcp_secret_file", "unknown_key", "unquoted", "url_password"],
)
def test_a_key_put_in_the_wrong_place_is_refused_without_being_echoed(text: str, tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    message = refusal(path, clean_env(tmp_path))
    assert SECRET not in message and SECRET[:12] not in message, message


def serve(tmp_path: Path, text: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`locod serve` as a user starts it, on a config that must be refused before any model is loaded."""
    path = tmp_path / "config.toml"
    path.write_text(text)
    env = {**clean_env(tmp_path), "HOME": str(tmp_path), **(extra_env or {})}
    command = locod_command("--config", str(path), "serve")
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize(
    ("text", "extra_env", "said"),
    [
        ('[daemon]\nqueue_limit = "many"\n', {}, "daemon.queue_limit expects an integer, got str 'many'"),
        ("[local]\nn_threads = 1.5\n", {}, "local.n_threads expects an integer, got float 1.5"),
        ("[cloud]\ntimeout_s = 0.000001\n", {}, "cloud.timeout_s must be between 0.1 and 3600, got 1e-06"),
        ("[routing]\nsla = nan\n", {}, "routing.sla must be a finite number, got nan"),
        ('[routing]\npolicy_path = "~nobody-here/p.onnx"\n', {}, "routing.policy_path must be an absolute path"),
        ('[telemetry]\nsysfs_root = "sys"\n', {}, "telemetry.sysfs_root must be an absolute path"),
        ("[routng]\nsla = 0.5\n", {}, "unknown key 'routng'"),
        ("[log]\n[log]\n", {}, "not valid TOML"),
        ('[[local.models]]\nname = ""\npath = "/x.gguf"\n', {}, "local.models[0].name must not be empty"),
        ("", {"LOCOD_SLA": "high"}, "$LOCOD_SLA: routing.sla expects a number, got 'high'"),
        ("", {"LOCOD_HUB_ENDPOINT": "hf.co"}, "$LOCOD_HUB_ENDPOINT: local.hub_endpoint must be an http(s) URL"),
        (
            CLOUD + f'api_key_env = "{SECRET}"\n',
            {},
            "api_key_env must name the environment variable",
        ),
    ],
)
def test_serve_refuses_a_sample_of_each_kind_in_one_line_with_status_2(
    text: str, extra_env: dict[str, str], said: str, tmp_path: Path
) -> None:
    done = serve(tmp_path, text, extra_env)
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and said in lines[0], done.stderr
    source = next(iter(extra_env), None)
    assert lines[0].startswith(f"locod: ${source}: " if source else f"locod: {tmp_path / 'config.toml'}: ")
    assert "Traceback" not in done.stderr + done.stdout and SECRET not in done.stderr + done.stdout


def test_a_reload_of_each_kind_of_bad_config_is_refused_and_the_old_one_serves_on(daemon_factory: Any) -> None:
    daemon: DaemonHandle = daemon_factory({"routing": {"mode": "local", "sla": 0.7}})
    shown = daemon.cli("config", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    bad = [
        ({"routing": {"mode": "local", "sla": "high"}}, "routing.sla expects a number"),
        ({"routing": {"mode": "local", "policy_path": "p.onnx"}}, "routing.policy_path must be an absolute"),
        ({"routing": {"mode": "local"}, "telemetry": {"procfs_root": "proc"}}, "telemetry.procfs_root must be"),
        ({"routing": {"mode": "local"}, "local": {"models": [{"name": " ", "path": "/x.gguf"}]}}, "must not be empty"),
        ({"routng": {"mode": "local"}}, "unknown key 'routng'"),
    ]
    for config, said in bad:
        write_config(daemon.config_path, config)
        done = daemon.cli("reload")
        assert done.returncode == 2, (config, done.stderr)
        # the client's own warning that it could not read the config either, then the daemon's refusal
        *_, line = done.stderr.strip().splitlines()
        assert line.startswith(f"locod: reload rejected, the running configuration kept: {daemon.config_path}: ")
        assert said in line, line
    assert daemon.cli("config", "show", "--json").stdout == shown.stdout
    assert json.loads(shown.stdout)["routing"]["sla"] == 0.7
    assert daemon.cli("ask", "Hi", "--max-tokens", "3").returncode == 0
    assert "Traceback" not in daemon.log()


def test_an_attachment_limit_past_what_a_read_can_ask_for_is_refused_and_the_most_still_attaches(
    daemon_factory: Any,
) -> None:
    """attachments.max_bytes was unbounded: at 10**20 `locod ask --attach` ended in an OverflowError's
    traceback (``read(max_bytes + 1)``), at a terabyte in a MemoryError, for a file of a few bytes."""
    daemon: DaemonHandle = daemon_factory({"routing": {"mode": "local"}})
    note = daemon.home / "note.md"
    note.write_text("Paris is the capital of France.\n")
    for too_many in (1 << 40, 10**20):
        write_config(daemon.config_path, {"routing": {"mode": "local"}, "attachments": {"max_bytes": too_many}})
        done = daemon.cli("reload")
        assert done.returncode == 2 and "attachments.max_bytes must be between 1 and " in done.stderr, done.stderr
    write_config(daemon.config_path, {"routing": {"mode": "local"}, "attachments": {"max_bytes": 1 << 30}})
    assert daemon.cli("reload").returncode == 0
    done = daemon.cli("ask", "What is this?", "--attach", str(note), "--max-tokens", "3")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("kind", ["fifo", "directory", "missing", "not_utf8"])
def test_a_config_file_that_is_no_readable_toml_file_stops_serve_in_one_line(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "not_utf8":
        path.write_bytes(b'[routing]\nmode = "\xff"\n')
    command = locod_command("--config", str(path), "serve")
    done = subprocess.run(command, capture_output=True, text=True, env=clean_env(tmp_path), timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"locod: {path}: ") and len(done.stderr.strip().splitlines()) == 1, done.stderr
