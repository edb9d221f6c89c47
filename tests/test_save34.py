"""A turn's decision waited for the previous turn's state save (save 34): the learner wrote the whole MESS+
state (serialise, fsync the file, rename, fsync the folder) while holding the lock every decision takes, after
every reply and every label. A client sending its next turn right after ``done`` (an agent loop, a second
dialogue) waited for those fsyncs before its turn was even decided. The state is now copied under the lock
and written after it is let go, the newest copy never overwritten by an older one.

The daemon's own decision objects run in this process (as scripts/bench_decision.py builds them): a real
DecisionLog in SQLite, the real Learner and Decider and MESS+ state file. ``os.fsync`` is wrapped to make a
decision at the very moment the save syncs the state folder: no timing, only what the lock allows then.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from locod.daemon.cloud import CloudBackend
from locod.daemon.config import CloudModelConfig, load_config
from locod.daemon.decider import Decider
from locod.daemon.decision import Decision
from locod.daemon.learner import Learner
from locod.daemon.local import LocalBackend, ModelZoo
from locod.daemon.records import DecisionLog
from locod.daemon.sessions import SessionStore
from locod.daemon.telemetry import TelemetrySampler
from locod.daemon.turn import Turn
from locod.protocol import ChatRequest

from .conftest import write_config


@dataclass
class Router:
    learner: Learner
    decider: Decider
    turn: Turn
    state: Path  # the MESS+ state file


@pytest.fixture
def router(tmp_path: Path, models_dir: Path) -> Iterator[Router]:
    """The daemon's decision objects with a state folder of their own and one cloud model, never contacted."""
    state_dir = tmp_path / "state"
    paths = {"state_dir": str(state_dir), "models_dir": str(models_dir)}
    config = load_config(
        write_config(tmp_path / "config.toml", {"paths": paths, "routing": {"explore_c": 0.0}}), env={}
    )
    mini = CloudModelConfig(name="mini", base_url="http://127.0.0.1:9/v1", model="m")
    config = replace(config, cloud=replace(config.cloud, default="mini", models=[mini]))
    records = DecisionLog(state_dir / "locod.db")
    cloud = CloudBackend(config.cloud, config.source)
    local = LocalBackend(ModelZoo(config.local.models, config.models_dir, config.local.memory_budget_mb, 1))
    telemetry = TelemetrySampler(config, cloud, local)
    telemetry.sample()
    learner = Learner(config, records, cloud)
    decider = Decider(config, learner, records, telemetry, local, cloud)
    session = SessionStore(1800, 100).open("save34", "ipc")
    request = ChatRequest("r", [{"role": "user", "content": "What is the capital of France?"}], session="save34")
    yield Router(learner, decider, Turn(request, session, b"client", "query", [], config), state_dir / "messplus.npz")
    learner.close()
    records.close()


def at_folder_sync(monkeypatch: pytest.MonkeyPatch, folder: Path, act: Callable[[], None]) -> None:
    """Run ``act`` once, right after the next fsync of ``folder`` (a save's last step, the rename synced)."""
    real, done = os.fsync, []

    def fsync(fd: int) -> None:
        real(fd)
        if not done and os.readlink(f"/proc/self/fd/{fd}") == str(folder.resolve()):
            done.append(True)
            act()

    monkeypatch.setattr(os, "fsync", fsync)


def settled_on_disk(state: Path) -> int:
    with np.load(state) as data:
        return int(data["settled"])


def test_a_decision_does_not_wait_for_the_save_in_progress(router: Router, monkeypatch: pytest.MonkeyPatch) -> None:
    """Settling a reply saves the state; a decision made while that save syncs the state folder is made
    at once, not held behind the lock (the save copied the state under it and writes after it)."""
    first, _, _, _ = router.decider.decide(router.turn)
    assert first.routing is not None and first.routing.s_hat_taken is not None, first  # a routed turn: it saves
    during: list[Decision | str] = []

    def decide_now() -> None:
        if not router.learner.lock.acquire(blocking=False):
            during.append("the learner's lock is held while the save syncs: a decision waits for it")
            return
        router.learner.lock.release()
        during.append(router.decider.decide(router.turn)[0])

    at_folder_sync(monkeypatch, router.state.parent, decide_now)
    router.learner.settle(1, first, "What is the capital of France?", "Paris.")
    assert len(during) == 1 and isinstance(during[0], Decision), during
    assert during[0].routing is not None  # decided by MESS+, its state read under the lock
    assert settled_on_disk(router.state) == 1  # on disk when settle returns, as before: a reply's save is done


def test_an_older_copy_is_never_written_over_a_newer_one(router: Router) -> None:
    """Two saves reach their writing in either order (each writes after letting the lock go): one whose copy
    is older than the copy written meanwhile writes nothing, and the file keeps the newer state."""
    learner, model = router.learner, router.decider.config.local.default
    with learner.lock:  # two changes, each copied under the lock as settle copies it
        learner.mess.settle(1, model, 0.9)
        older = learner._copy()
        learner.mess.settle(2, model, 0.9)
        newer = learner._copy()
    learner._write(newer)
    learner._write(older)  # the first change's save, come to its writing last
    assert settled_on_disk(router.state) == 2
