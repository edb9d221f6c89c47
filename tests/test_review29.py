"""Review 29: what a fresh read of the session's changes found, each held here on real parts (a daemon with
the embedded model, its real disk park of KV states).

A directory at a parked KV state's temp name (``kvcache/<hash>.tmp``): ``create_anew`` refuses it, as it
should, but the park's clean-up then removed the same path again outside any handler, so the
IsADirectoryError escaped the park, and the stop's ``park_all`` with it: the stop exited 1 ("locod: ...tmp:
Is a directory") before the decision log was closed and the socket removed (an eviction mid-run would fail
the turn that evicted).
"""

from __future__ import annotations

from typing import Any

from locod.daemon.config import EMBEDDED_MODEL
from locod.daemon.kvpark import DiskPark

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
