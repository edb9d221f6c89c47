"""Review 29: what a fresh read of the session's changes found, each held here on real parts (a daemon with
the embedded model, its real disk park of KV states).

A directory at a parked KV state's temp name (``kvcache/<hash>.tmp``): ``create_anew`` refuses it, as it
should, but the park's clean-up then removed the same path again outside any handler, so the
IsADirectoryError escaped the park, and the stop's ``park_all`` with it: the stop exited 1 ("locod: ...tmp:
Is a directory") before the decision log was closed and the socket removed (an eviction mid-run would fail
the turn that evicted).

A model pulled as ``auto`` by a locod of before that name was refused (``models pull`` took it): the config
check refuses the name, so after the upgrade every start, and every command that reads the config, exited 2
naming the config file, which does not hold it; ``locod models rm auto``, the way out, was refused the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from locod.daemon.catalog import manifest_path, pulled_models
from locod.daemon.config import EMBEDDED_MODEL
from locod.daemon.kvpark import DiskPark

from .conftest import start_daemon

MODEL = EMBEDDED_MODEL.name


def test_a_directory_at_a_parked_states_temp_name_does_not_break_the_stop(daemon_factory: Any) -> None:
    daemon = daemon_factory({"local": {"cache_disk_mb": 64}})
    park = DiskPark(daemon.home / "state" / "kvcache", 64 << 20)
    temp = park._path(MODEL, "ipc:s1").with_suffix(".tmp")  # where the ipc door's session s1 is written first
    temp.mkdir()
    done = daemon.client().ask("Say hello.", session="s1", max_tokens=2).done
    assert done is not None and done.outcome == "ok"
    assert daemon.stop() == 0, daemon.log()
    log = daemon.log()
    assert "Traceback" not in log and "stopped after 1 turns" in log
    assert f"could not park a dialogue's KV state in {temp.parent}: {temp.name}: Is a directory" in log


def test_a_model_pulled_as_auto_before_the_name_was_refused_is_left_out_not_fatal(
    tmp_path: Path, models_dir: Path
) -> None:
    mine = tmp_path / "models"
    mine.mkdir()
    (mine / EMBEDDED_MODEL.path).symlink_to(models_dir / EMBEDDED_MODEL.path)
    (mine / "pulled.gguf").symlink_to(models_dir / EMBEDDED_MODEL.path)
    manifest_path(mine).write_text(  # as `locod models pull URL --name auto` registered it then
        '[[model]]\nname = "auto"\nfile = "pulled.gguf"\nsize = 1\nsha256 = "00"\n'
        'origin = "https://example.com/pulled.gguf"\nquantisation = "Q4_1"\ncontext_length = 2048\nn_ctx = 2048\n'
    )
    daemon = start_daemon(tmp_path / "d", mine)
    try:
        said = f"{manifest_path(mine)}: the model pulled as 'auto' is left out"
        assert said in daemon.log()
        assert daemon.client().ask("Say hello.", max_tokens=2).done is not None
        listed = daemon.cli("models", "list")
        assert listed.returncode == 0 and said in listed.stderr and "pulled.gguf" not in listed.stdout
        removed = daemon.cli("models", "rm", "auto")
        assert removed.returncode == 0, removed.stderr
        assert pulled_models(mine) == [] and not (mine / "pulled.gguf").exists()
    finally:
        daemon.stop()
