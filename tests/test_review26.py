"""Review of session 26's change: what it meant to fix and left open."""

from __future__ import annotations

import resource
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from locod.daemon.config import load_config
from locod.daemon.sessions import SessionStore, TurnTrail
from locod.errors import ConfigError

from .test_env26 import _env, _one_line

TRAIL = TurnTrail("local", (), "chat")


def test_a_model_load_out_of_memory_under_ulimit_v_is_said_in_one_line_naming_the_limit(
    tmp_path: Path, models_dir: Path
) -> None:
    """Under `ulimit -v` the load may fail in llama-cpp-python's own allocation (numpy's MemoryError for its
    96 MiB logits array, after llama.cpp made its context) rather than in llama.cpp's: the start ended in that
    traceback, without the note on the limit, and test_env26 (at one limit, where either may fail first)
    skipped it as a start that failed before the model's load. Limits are raised 16 MiB at a time, through
    that array's window, until a load fails there; one that serves ends the search."""
    env = _env(tmp_path, models_dir)
    command = [sys.executable, "-m", "locod.cli", "serve"]
    for mib in range(976, 2048, 16):
        try:
            result = subprocess.run(
                command,
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
                preexec_fn=lambda mib=mib: resource.setrlimit(resource.RLIMIT_AS, (mib << 20, mib << 20)),
            )
        except subprocess.TimeoutExpired:  # served: the model loaded within this limit
            break
        if result.returncode < 0 or ("could not load" not in result.stderr and "in _read" not in result.stderr):
            continue  # failed before the model's load (a library, a thread): not what this tests
        said = _one_line(result)
        assert result.returncode == 3, result.stderr
        assert f"address space is limited to {mib} MiB, ulimit -v" in said, said
        if "out of memory (" in said:
            return
    pytest.skip("no limit failed the load in llama-cpp-python's own allocation here")


def test_a_path_under_the_home_of_no_such_user_is_refused_as_relative(tmp_path: Path) -> None:
    """`~name/...` is expanded for a user of that name; of none, it stays as written, a relative path: it
    passed the check for relative paths (it begins with ~) and made a folder named `~name` wherever the daemon
    started."""
    with pytest.raises(ConfigError, match=r"paths.state_dir must be an absolute path or begin with ~/, got '~no"):
        load_config(env={"LOCOD_STATE_DIR": "~no-such-user-locod/state", "XDG_CONFIG_HOME": str(tmp_path)})
    home = load_config(env={"LOCOD_STATE_DIR": "~/state", "XDG_CONFIG_HOME": str(tmp_path)}).state_dir
    assert home == Path.home() / "state"


def test_a_session_idle_past_session_idle_s_starts_afresh_though_its_next_turn_is_queued_in_it() -> None:
    """A session with a turn in flight is not expired (attack 26), and a turn is in flight from its admission,
    before it opens its session: so the turn that came back to a session idle for hours kept it from
    expiring, and continued a history `session_idle_s` had dropped (unless another session's turn or a
    `status` had expired it in between). A turn in flight in another session still keeps that one."""
    store = SessionStore(idle_s=60, max_sessions=10)
    sessions = [store.open(name, "ipc") for name in ("idle", "busy")]
    for session in sessions:
        store.record(session, [{"role": "user", "content": "Remember PLUM."}], "Ok.", TRAIL)
        session.last_used -= 3600  # an hour unused
    store.enter("busy", "ipc", threading.Event())  # a turn of it, still answering
    coming_back = threading.Event()
    store.enter("idle", "ipc", coming_back)
    assert store.wait_turn("idle", "ipc", coming_back, threading.Event())  # first in its queue
    session = store.open("idle", "ipc")
    assert session.messages == [] and session.turns == 0
    assert len(store) == 2  # "busy" kept while its turn answers
