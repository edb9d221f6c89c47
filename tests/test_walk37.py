"""Walk 37: a laptop user from Ollama and the OpenAI Python client, setting locod up from README.md: the
quick start, a chat with a photo and notes, llama.cpp's server as the cloud with a key file, the HTTP door
with the SDK, a config key changed and reloaded, a typo reloaded, the daemon restarted. Real daemons (the
embedded model) and the real `locod` command."""

from __future__ import annotations

import json

from .conftest import DaemonHandle, free_port


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
