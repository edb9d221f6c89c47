"""Configuration: file, LOCOD_* overrides, --set overrides, and errors that name file, key and type."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from locod.daemon import config as config_module
from locod.daemon.config import load_config
from locod.errors import ConfigError

from .conftest import locod_command


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults_follow_xdg(tmp_path: Path) -> None:
    env = {
        "XDG_STATE_HOME": str(tmp_path / "st"),
        "XDG_RUNTIME_DIR": str(tmp_path / "rt"),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "XDG_CONFIG_HOME": str(tmp_path / "nothing"),
    }
    config = load_config(env=env)
    assert config.db_path == tmp_path / "st" / "locod" / "locod.db"
    assert config.ipc_endpoint == f"ipc://{tmp_path / 'rt' / 'locod' / 'locod.sock'}"
    assert config.models_dir == tmp_path / "data" / "locod" / "models"
    assert config.local.models[0].name == "smollm2-135m-instruct"


def test_systemd_directories_win_over_xdg(tmp_path: Path) -> None:
    env = {"STATE_DIRECTORY": "/var/lib/locod", "RUNTIME_DIRECTORY": "/run/locod", "XDG_STATE_HOME": "/x"}
    config = load_config(write(tmp_path, ""), env=env)
    assert config.state_dir == Path("/var/lib/locod") and config.runtime_dir == Path("/run/locod")


def test_precedence_file_then_env_then_cli(tmp_path: Path) -> None:
    path = write(tmp_path, '[log]\nlevel = "DEBUG"\n[routing]\nsla = 0.6\n')
    config = load_config(path, env={"LOCOD_LOG_LEVEL": "WARNING", "LOCOD_SLA": "0.7"}, overrides={"routing.sla": "0.9"})
    assert config.log.level == "WARNING"
    assert config.routing.sla == 0.9


def test_a_choice_is_taken_in_any_case_and_kept_as_the_schema_spells_it(tmp_path: Path) -> None:
    path = write(tmp_path, '[routing]\nmode = "Local"\n')
    config = load_config(path, env={"LOCOD_LOG_LEVEL": "debug"}, overrides={"routing.shadow": "ALWAYS"})
    assert (config.routing.mode, config.log.level, config.routing.shadow) == ("local", "DEBUG", "always")


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, '[routing]\nmode = "local"\n')
    assert load_config(env={"LOCOD_CONFIG": str(path)}).routing.mode == "local"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[daemon]\nbogus = 1\n", "unknown key 'daemon.bogus'"),
        (
            '[http]\ncors_origins = ["http://localhost:3000/"]\n',
            "http.cors_origins holds 'http://localhost:3000/', not an",
        ),
        ("[nosuch]\nx = 1\n", "unknown key 'nosuch'"),
        ('[daemon]\nmax_message_bytes = "big"\n', "daemon.max_message_bytes expects an integer, got str"),
        ("[routing]\nsla = 1.5\n", "routing.sla must be between 0.0 and 1.0, got 1.5"),
        ('[routing]\nmode = "maybe"\n', "routing.mode must be one of auto, local, cloud"),
        ("[log]\nprompts = 1\n", "log.prompts expects true or false"),
        ('[[local.models]]\nname = "x"\n', "local.models[0].path is required"),
        (
            '[[cloud.models]]\nname = "c"\nbase_url = "ftp://x"\nmodel = "m"\n',
            "base_url must be an http(s) URL, such as https://api.openai.com/v1, got 'ftp://x'",
        ),
        ('[local]\ndefault = "ghost"\n', "local.default is 'ghost', which names no local model"),
        ('[routing]\nmode = "cloud"\n', "routing.mode is 'cloud', but no cloud model is configured: add a"),
        ('[local]\ndefault = ""\n', "local.default is '', which names no local model"),
        ('[http]\nlisten = "0.0.0.0:8080"\n', "http.listen binds 0.0.0.0, beyond loopback: set http.api_key_file"),
        (
            '[daemon]\ntcp = "tcp://0.0.0.0:5557"\n',
            "daemon.tcp binds 0.0.0.0, beyond loopback: set daemon.tcp_secret_file",
        ),
        ('[daemon]\ntcp = "localhost"\n', "daemon.tcp must look like tcp://127.0.0.1:5557"),
        ('[paths]\nallow_dirs = "/tmp"\n', "paths.allow_dirs expects a list of strings, got str"),
        ("this is = = not toml", "not valid TOML"),
    ],
)
def test_errors_name_file_key_and_type(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert message in info.value.message
    assert info.value.message.startswith(f"{path}: ")


def test_bad_env_override_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\$LOCOD_SLA: routing.sla expects a number"):
        load_config(write(tmp_path, ""), env={"LOCOD_SLA": "high"})


def test_an_override_into_a_section_the_file_gave_no_table_names_the_file(tmp_path: Path) -> None:
    """Review finding: `routing = 5` in the file with $LOCOD_SLA set ended in a TypeError traceback (the
    override was put into the file's 5) instead of the file's one-line error."""
    path = write(tmp_path, "routing = 5\n")
    with pytest.raises(ConfigError, match=r"\[routing\] must be a table, got int") as info:
        load_config(path, env={"LOCOD_SLA": "0.5"})
    assert info.value.message.startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("env", "overrides", "message"),
    [
        ({"LOCOD_SLA": "2"}, {}, "$LOCOD_SLA: routing.sla must be between 0.0 and 1.0, got 2.0"),
        ({}, {"routing.sla": "2"}, "override routing.sla: routing.sla must be between 0.0 and 1.0, got 2.0"),
        ({"LOCOD_ROUTING": "maybe"}, {}, "$LOCOD_ROUTING: routing.mode must be one of auto, local, cloud"),
        ({"LOCOD_LOCAL_MODEL": "ghost"}, {}, "$LOCOD_LOCAL_MODEL: local.default is 'ghost', which names no local"),
        ({"LOCOD_ROUTING": "cloud"}, {}, "$LOCOD_ROUTING: routing.mode is 'cloud', but no cloud model is configured"),
        ({}, {"cloud.default": "ghost"}, "override cloud.default: cloud.default is 'ghost', which names no cloud"),
        # a typo names what was meant, then lists what is known, as the same typo in the file does
        (
            {},
            {"routing.sal": "0.9"},
            "override routing.sal: unknown key 'routing.sal' (did you mean 'sla'? known here: ",
        ),
        (
            {},
            {"routin.sla": "0.9"},
            "override routin.sla: unknown section 'routin' (did you mean 'routing'? known here",
        ),
        ({}, {"routing.zzz": "0"}, "override routing.zzz: unknown key 'routing.zzz' (known here: battery_crit"),
    ],
)
def test_out_of_range_overrides_name_their_source_not_the_file(
    tmp_path: Path, env: dict[str, str], overrides: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, ""), env=env, overrides=overrides)
    assert info.value.message.startswith(message), info.value.message


def test_an_unknown_locod_variable_is_warned_of_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config_module, "_warned", set())  # once per process: start this one afresh
    env = {"LOCOD_SLAA": "0.9", "LOCOD_VENV": ".venv"}
    load_config(write(tmp_path, ""), env=env)
    load_config(write(tmp_path, ""), env=env)
    warnings = [r.getMessage() for r in caplog.records if "LOCOD_" in r.getMessage()]
    assert len(warnings) == 1 and "LOCOD_SLAA (did you mean LOCOD_SLA?)" in warnings[0], warnings
    assert "LOCOD_SLA," in warnings[0], warnings
    assert "LOCOD_VENV" not in warnings[0]  # the scripts' own variables are not news


def test_config_show_prints_effective_values_without_secrets(tmp_path: Path) -> None:
    path = write(tmp_path, '[[cloud.models]]\nname = "c"\nbase_url = "http://127.0.0.1:9/v1"\nmodel = "m"\n')
    env = {"LOCOD_CLOUD_API_KEY": "sk-test-secret-123", "LOCOD_SLA": "0.65", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        locod_command("--config", str(path), "config", "show"), capture_output=True, text=True, env=env, check=True
    ).stdout
    assert "sla = 0.65" in out and 'base_url = "http://127.0.0.1:9/v1"' in out
    assert "sk-test-secret-123" not in out


def test_cli_reports_config_error_with_exit_code_2(tmp_path: Path) -> None:
    path = write(tmp_path, "[routing]\nsla = 7\n")
    result = subprocess.run(locod_command("--config", str(path), "config", "show"), capture_output=True, text=True)
    assert result.returncode == 2
    assert "routing.sla must be between" in result.stderr and "Traceback" not in result.stderr


def test_documented_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parent.parent / "docs" / "config.example.toml"
    config = load_config(example, env={})
    assert config.cloud.default == "mini"
    assert [m.name for m in config.local.models] == ["smollm2-135m-instruct", "llama-3.2-3b"]


@pytest.mark.parametrize(
    ("key", "literal"),
    [
        ("routing.sla", "nan"),
        ("cloud.timeout_s", "nan"),
        ("daemon.shutdown_grace_s", "inf"),
        ("cloud.daily_cap_usd", "+inf"),
        ("routing.weight_policy", "-nan"),
        ("telemetry.bandwidth_prior_bps", "inf"),
    ],
)
def test_non_finite_numbers_are_refused_naming_the_key(tmp_path: Path, key: str, literal: str) -> None:
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=rf"{key} must be a finite number"):
        load_config(write(tmp_path, f"[{section}]\n{name} = {literal}\n"), env={})
    with pytest.raises(ConfigError, match=rf"{key} must be a finite number"):  # and as an override
        load_config(write(tmp_path, ""), env={}, overrides={key: literal})


@pytest.mark.parametrize(
    "text",
    [
        "x = " + "[" * 5000 + "]" * 5000 + "\n",  # nested deeper than the parser's recursion
        "x = " + "{a = " * 5000 + "1" + "}" * 5000 + "\n",
        "x = " + "7" * 5000 + "\n",  # an integer over Python's 4,300-digit conversion limit
    ],
)
def test_any_parse_failure_is_one_line_without_traceback(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert "not valid TOML" in info.value.message and "\n" not in info.value.message
    result = subprocess.run(locod_command("--config", str(path), "config", "show"), capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_config_file_that_is_not_a_regular_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo)  # opening it blocking would wait for a writer forever
    with pytest.raises(ConfigError, match="not a regular file") as info:
        load_config(fifo, env={})
    assert str(fifo) in info.value.message
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path, env={})  # a directory
