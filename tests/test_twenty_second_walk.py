"""Walk 22: a new user from the README on a fresh clone, then the docs it leads to, and the usual slips: a
state directory written as ``~/...``, a config file not where locod looks, a cloud model without its key,
a text-only "cloud" sent an image, a second daemon.

Real parts throughout: the daemon with the embedded model, the real `locod` command, and the loopback
`llama_cpp.server` (serving the same GGUF, which cannot see images) as the cloud.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from .conftest import SECRET, CloudServer, DaemonHandle, cloud_config, locod_command, wait_for, write_config


def test_a_state_directory_under_home_is_in_the_home_and_a_relative_one_is_refused(
    daemon_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`[paths] state_dir = "~/state"` was taken as written: the daemon made a folder named `~` in the
    directory it was started in and kept its decision log there, where `locod decisions` run from anywhere
    else did not look. Now `~` is the home directory, as in the key-file paths, and a relative directory,
    which the daemon and each command would read from a different place, is refused naming its key."""
    monkeypatch.chdir(tmp_path)  # the daemon and the commands start here, as from a user's shell
    home = tmp_path / "d"  # the daemon_factory's home for this daemon
    handle = daemon_factory({"paths": {"state_dir": "~/state"}}, extra_env={"LOCOD_STATE_DIR": "", "HOME": str(home)})
    asked = handle.cli("ask", "--max-tokens", "2", "Hi")
    assert asked.returncode == 0, asked.stderr
    assert not (tmp_path / "~").exists()
    assert [row["outcome"] for row in handle.rows()] == ["ok"]  # the log is ~/state/locod.db, in its home
    assert f"decision log {home / 'state' / 'locod.db'}" in handle.cli("status").stdout

    relative = {**handle.env, "LOCOD_STATE_DIR": "state"}
    refused = subprocess.run(locod_command("serve"), capture_output=True, text=True, env=relative, timeout=120)
    assert refused.returncode == 2, refused.stderr
    assert "$LOCOD_STATE_DIR: paths.state_dir must be an absolute path or begin with ~/, got 'state'" in refused.stderr
    assert not (tmp_path / "state").exists()


def test_reload_says_where_it_looked_for_the_config_and_that_a_cloud_model_has_no_key(
    tmp_path: Path, models_dir: Path
) -> None:
    """The user put the config where it is not read (`~/.config/locod.toml`) and reloaded: "no config file
    was found" did not say where locod looks. Moved to the right place, with a cloud model and no key yet, the
    reload said only "reloaded from ...": the missing key was in the daemon's log and `locod status` alone,
    and the model's first turn to a real endpoint would fail. Then a second `locod serve` was refused as
    "already running" without saying what to do about the one that runs."""
    if Path("/etc/locod/config.toml").exists():
        pytest.skip("this machine has a system-wide locod config, which the daemon would read")
    home, config_home = tmp_path / "home", tmp_path / "xdg"
    home.mkdir()
    (config_home / "locod").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCOD_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(config_home),
        LOCOD_STATE_DIR=str(tmp_path / "state"),
        LOCOD_RUNTIME_DIR=str(tmp_path / "run"),
        LOCOD_MODELS_DIR=str(models_dir),
        PYTHONUNBUFFERED="1",
    )
    log_path = tmp_path / "daemon.log"
    with log_path.open("wb") as log_file:  # no --config: the daemon looks for its file where the docs say
        proc = subprocess.Popen(locod_command("serve"), env=env, stdout=log_file, stderr=subprocess.STDOUT)
    handle = DaemonHandle(proc, home, Path(), log_path, env)
    try:
        wait_for(lambda: proc.poll() is None and "serving on" in handle.log(), 120, "the daemon to serve")

        def locod(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(locod_command(*args), capture_output=True, text=True, env=env, timeout=120)

        misplaced = write_config(config_home / "locod.toml", {"routing": {"sla": 0.9}})
        reload = locod("reload")
        assert reload.returncode == 0, reload.stderr
        assert "no config file was found ($LOCOD_CONFIG, $XDG_CONFIG_HOME/locod/config.toml" in reload.stdout
        assert "/etc/locod/config.toml)" in reload.stdout

        misplaced.unlink()
        cloud = {"name": "gpt-mini", "base_url": "http://127.0.0.1:9/v1", "model": "gpt-4o-mini"}
        write_config(config_home / "locod" / "config.toml", {"cloud": {"models": [cloud]}})
        reload = locod("reload")
        assert reload.returncode == 0, reload.stderr
        assert f"reloaded from {config_home / 'locod' / 'config.toml'}" in reload.stdout
        assert (
            "note: cloud model gpt-mini has no API key: set $LOCOD_CLOUD_API_KEY (and restart) or its "
            "api_key_file (and reload)" in reload.stderr
        )

        second = locod("serve")
        assert second.returncode == 4, second.stderr
        assert "another locod daemon is already running with" in second.stderr
        assert "`locod status` shows it and `locod stop` stops it" in second.stderr
    finally:
        handle.stop()


def test_a_text_only_cloud_model_sent_an_image_names_the_vision_key(
    daemon_factory: Any, cloud_server: CloudServer, tmp_path: Path
) -> None:
    """A `[[cloud.models]]` entry is taken to see images (`vision` defaults to true). The loopback server's
    text-only GGUF, sent an image, answers with an empty stream; the turn fell back saying only "the endpoint
    returned no answer text", which names nothing to change. It now says which key to set."""
    config = cloud_config(cloud_server.base_url, mode="cloud", timeout_s=120.0, deadline_s=600.0)
    handle: DaemonHandle = daemon_factory(config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(photo)
    asked = handle.cli("ask", "--max-tokens", "4", "--attach", str(photo), "What colour is this?", timeout=600)
    assert asked.returncode == 0, asked.stderr
    assert "the endpoint returned no answer text (if it cannot see images, set vision = false for 'cloud-small')" in (
        asked.stderr
    )
    assert handle.rows()[0]["outcome"] == "fallback"


def test_a_report_of_local_turns_alone_draws_no_negative_money(tmp_path: Path) -> None:
    """Before a cloud model was configured every turn cost $0, and the money panel drew them on an axis from
    -0.04 to 0.04 USD, as if money could be negative."""
    import matplotlib.pyplot as plt

    from locod.daemon.history import parse_since, read_history
    from locod.daemon.records import DecisionLog, DecisionRecord, Outcome
    from locod.report import figure

    log = DecisionLog(tmp_path / "locod.db")
    for turn in range(3):
        decision = log.begin(DecisionRecord("s", turn, "r", "0" * 64, 5, None, "chat", "local", "local", "test"))
        log.finish(decision, Outcome("ok", "local", "smollm2-135m-instruct", cost_usd=0.0, energy_j=1.0))
    log.close()
    fig = figure(read_history(tmp_path / "locod.db", parse_since("7d")), 0.0, "t")
    try:
        money = next(ax for ax in fig.axes if ax.get_title() == "money per day")
        assert money.get_ylim()[0] == 0
    finally:
        plt.close(fig)


def test_an_unquoted_value_in_the_config_says_that_text_needs_quotes(tmp_path: Path) -> None:
    """`mode = auto` and `path = ~/models/x.gguf`, written as a shell takes them, stopped the daemon with
    tomllib's "Invalid value (at line 2, column 8)", which does not say what is invalid about it."""
    config = tmp_path / "config.toml"
    config.write_text("[routing]\nmode = auto\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCOD_")}
    env.update(LOCOD_STATE_DIR=str(tmp_path / "state"), LOCOD_RUNTIME_DIR=str(tmp_path / "run"))
    served = subprocess.run(
        locod_command("--config", str(config), "serve"), capture_output=True, text=True, env=env, timeout=120
    )
    assert served.returncode == 2, served.stderr
    assert (
        f"{config}: not valid TOML: Invalid value (at line 2, column 8); text, paths included, needs quotes "
        '(mode = "auto"), and a boolean is true or false' in served.stderr
    )
