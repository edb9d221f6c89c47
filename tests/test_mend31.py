"""Mend 31: what earlier sessions noticed and left alone, each confirmed on real parts and mended here.

A predictor prior is written whole or not at all; every number of ``[routing]`` whose nonsense value broke
the router is refused naming it, and a MESS+ state file's price window is checked like its other arrays;
the MESS+ state tells the log it was kept with from another (a backup restored, a new log) by the log's
identity, so it never settles or learns another log's turns as its own.
"""

from __future__ import annotations

import base64
import logging
import shutil
import socketserver
import sqlite3
import subprocess
import sys
import textwrap
import threading
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from locod.daemon.cloud import CloudBackend
from locod.daemon.config import load_config
from locod.daemon.learner import Learner
from locod.daemon.records import DecisionLog
from locod.errors import ConfigError
from locod.policy.messplus import DIM, MessPlus
from locod.policy.warmstart import Prior, read_prior, save_prior

from .conftest import cloud_config, wait_for, write_config
from .test_mend28 import routed


def test_a_prior_cut_short_while_written_leaves_the_good_one_it_replaced(tmp_path: Path) -> None:
    """``save_prior`` wrote the prior in place (``open("wb")``): a refit over a good prior (scripts/fit_prior.py
    writes the user's with it) cut short by a crash, a power loss or a full disk left a damaged file where the
    good one was, which the daemon then left out ("is unreadable"). Now it is written beside it, fsynced and
    renamed. The cut is real: a process whose file-size limit (RLIMIT_FSIZE) stops the write part-way, as a
    full disk does."""
    folder = tmp_path / "priors"
    good = Prior("ab" * 32, 1234, np.full(DIM, 0.25), np.zeros(4), "the good one")
    path = save_prior(good, folder)
    refit = textwrap.dedent(
        f"""
        import resource, signal
        import numpy as np
        from pathlib import Path
        from locod.policy.warmstart import Prior, save_prior
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG), as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
        rng = np.random.default_rng(0)  # incompressible: far over the limit
        refit = Prior({good.sha256!r}, 1234, rng.normal(size={DIM}), np.zeros(4), "the refit")
        save_prior(refit, Path({str(folder)!r}))
        """
    )
    cut = subprocess.run([sys.executable, "-c", refit], capture_output=True, text=True, timeout=120)
    assert cut.returncode != 0 and "File too large" in cut.stderr, cut.stderr
    kept = read_prior(path)  # on the old code: "not a prior file, or a damaged one"
    assert kept.source == "the good one" and np.allclose(kept.weights, 0.25)
    assert sorted(p.name for p in folder.iterdir()) == [path.name]  # no half-written temp file left beside it


@pytest.mark.parametrize("v", [0, 0.0, 1e-320])
def test_a_v_that_makes_the_rule_weigh_nothing_or_overflow_is_refused_naming_the_key(tmp_path: Path, v: float) -> None:
    """``routing.v = 0`` was taken: every action's objective was then 0 (V * cost + V * price * ...), so each
    turn went to whichever action was listed first, whatever it cost or was predicted to satisfy; a V of
    1e-320 made the price of satisfaction (Z / V) inf. Both are refused as any out-of-range value is, in one
    line naming the file, the key and the range, from the file and from ``--set``."""
    path = write_config(tmp_path / "config.toml", {"routing": {"v": v}})
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert str(refused.value) == f"{path}: routing.v must be between 0.001 and 1000000.0, got {v!r}"
    with pytest.raises(ConfigError, match=r"^override routing.v: routing.v must be between 0.001 and"):
        load_config(write_config(tmp_path / "empty.toml", {}), overrides={"routing.v": str(v)})
    assert load_config(write_config(tmp_path / "least.toml", {"routing": {"v": 0.001}})).routing.v == 0.001


@pytest.mark.parametrize(
    ("bases", "steps", "why"),
    [
        (np.full(1000, 0.5), np.zeros((0, 3)), "expected (<= 256,)"),  # stayed 1,000 turns long for good
        (np.array([np.nan, 0.5]), np.zeros((0, 3)), "not finite"),
        (np.array([0.5, 0.5]), np.array([[0.0, -1e300, 0.2]]), "a negative price"),
        (np.array([0.5, 0.5]), np.array([[-1.0, 1.0, 0.2]]), "a step of no turn in it"),  # taken as the last turn's
        (np.array([7.0, 0.5]), np.zeros((0, 3)), "beyond [0, 1]"),
    ],
)
def test_a_state_file_whose_price_window_no_daemon_wrote_is_set_aside(
    tmp_path: Path, bases: np.ndarray, steps: np.ndarray, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The MESS+ state's price window (the last 256 turns' options, which set the feed-forward price) was
    restored unchecked: a window of 1,000 turns stayed 1,000 long (each turn drops one), a NaN or negative
    price decided the price of every turn after, a step of turn -1 was taken as the last turn's. Such a
    file is set aside as damaged, as one with arrays of the wrong shapes already was."""
    path = tmp_path / "messplus.npz"
    kept = mess_at(path)
    for decision in range(1, 4):
        kept.choose({"local": 0.01, "cloud": 1.0}, s_hat={"local": 0.3, "cloud": 0.95})
        kept.settle(decision, "local", 0.3)
    kept.save()
    assert len(mess_at(path).state.price.turns) == 3  # as written: taken
    with np.load(path) as saved:
        arrays = dict(saved)
    with path.open("wb") as f:
        np.savez(f, **{**arrays, "price_bases": bases, "price_steps": steps})
    with caplog.at_level(logging.ERROR, "locod.policy.messplus"):
        restarted = mess_at(path)
    assert why in caplog.text and "kept aside as" in caplog.text
    assert len(restarted.state.price.turns) == 0 and restarted.state.settled == 0
    assert [p.name.startswith("messplus.npz.bad-") for p in tmp_path.iterdir()] == [True]


def mess_at(path: Path) -> MessPlus:
    return MessPlus({"local": 0.5, "cloud": 0.85}, sla=0.8, v=20.0, explore_c=0.0, q_cap=50.0, path=path)


def test_a_state_kept_with_another_decision_log_settles_and_learns_none_of_its_turns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The MESS+ state tells missed turns by the decision ids it settled and the log's newest id: a log that
    is not the one it was kept with (a new file, another device's), with more decisions than the state knew,
    had its turns after the state's newest settled as missed turns of this state and the labels of its turns
    under the ids the state waited on learned as this state's (queue and predictor). The log now has an
    identity (kept by its backups), and the state keeps it: another log's ids are all dropped, and nothing of
    it is settled or learned. The real Learner over real decision logs, as test_mend28's."""
    others = DecisionLog(tmp_path / "other" / "locod.db")  # another daemon's: five turns, each labelled
    try:
        other = learner(tmp_path / "other", others)
        for _ in range(5):
            decision = routed(others, other)
            other.settle(*decision, "Hi", "Hello")
            other.feedback(decision[0], False, "user")
        other.close()
    finally:
        others.close()
    state = tmp_path / "state"
    records = DecisionLog(state / "locod.db")
    try:
        kept = learner(state, records)
        for _ in range(3):
            kept.settle(*routed(records, kept), "Hi", "Hello")
        kept.close()  # a clean stop: the state was kept with decisions 1-3 of this log
        before = (kept.mess.state.settled, kept.mess.state.z, dict(kept.mess.state.labels))
    finally:
        records.close()
    for name in ("locod.db", "locod.db-wal", "locod.db-shm"):
        (state / name).unlink(missing_ok=True)
    shutil.copy(tmp_path / "other" / "locod.db", state / "locod.db")  # the other log put in its place
    records = DecisionLog(state / "locod.db")
    try:
        with caplog.at_level(logging.WARNING, "locod.daemon.learner"):
            moved = learner(state, records)
        assert "is not the one the MESS+ state was kept with" in caplog.text
        # on the old code: settled 5 (decisions 4 and 5 of the other log), 5 labels learned, Z moved by them
        assert (moved.mess.state.settled, moved.mess.state.z, dict(moved.mess.state.labels)) == before
        assert moved.mess.state.settled_ids == {} and moved.mess.state.pending == {}
        six = routed(records, moved)  # this log's next turn, answered, then killed before its settling
        again = learner(state, records)  # the state saved with this log's identity: the turn is settled once
        assert again.mess.state.settled == before[0] + 1 and list(again.mess.state.settled_ids) == [six[0]]
        again.close()
    finally:
        records.close()


def test_a_decision_log_restored_from_its_backup_keeps_the_ids_it_still_holds(tmp_path: Path) -> None:
    """A log restored from its own backup (``VACUUM INTO``, docs/operations.md) under a state that went on
    after it holds fewer decisions than the state knows: every id the state held was dropped, so a label
    for a turn the backup holds, which the state still waited on, trained the predictor but no longer
    corrected the queue. Now only the ids after the backup's newest (given again to new turns) are dropped;
    a turn after the restore is settled once, and a label for a turn in the backup corrects the queue."""
    state = tmp_path / "state"
    records = DecisionLog(state / "locod.db")
    try:
        running = learner(state, records)
        for _ in range(3):
            running.settle(*routed(records, running), "Hi", "Hello")
        with closing(sqlite3.connect(state / "locod.db")) as conn:
            conn.execute(f"VACUUM INTO '{tmp_path / 'backup.db'}'")
        for _ in range(2):
            running.settle(*routed(records, running), "Hi", "Hello")
        running.close()  # a clean stop after decision 5
    finally:
        records.close()
    for name in ("locod.db-wal", "locod.db-shm"):
        (state / name).unlink(missing_ok=True)
    shutil.copy(tmp_path / "backup.db", state / "locod.db")  # restored as the docs say
    records = DecisionLog(state / "locod.db")
    try:
        restored = learner(state, records)
        assert sorted(restored.mess.state.settled_ids) == [1, 2, 3] and sorted(restored.mess.state.pending) == [1, 2, 3]
        z = restored.mess.state.z
        restored.feedback(2, False, "user")  # predicted 0.6, so the queue moves by 0.6 more
        assert restored.mess.state.z == pytest.approx(z + 0.6)
        four = routed(records, restored)  # a new turn under an id the state had settled before: killed unsettled
        assert four[0] == 4
        again = learner(state, records)
        assert again.mess.state.settled == restored.mess.state.settled + 1
        assert sorted(again.mess.state.settled_ids) == [1, 2, 3, 4]
        again.close()
    finally:
        records.close()


def learner(state: Path, records: DecisionLog) -> Learner:
    """The daemon's Learner on ``state`` as its state directory, over ``records``."""
    loaded = load_config(write_config(state.with_name(f"{state.name}.toml"), {"paths": {"state_dir": str(state)}}))
    return Learner(loaded, records, CloudBackend(loaded.cloud, loaded.source))


class TunnelProxy(socketserver.ThreadingTCPServer):
    """An HTTP proxy on loopback that answers every CONNECT with ``answer`` and closes: ``502 Bad Gateway``
    as a proxy does whose endpoint is down, ``200 Connection established`` as one that reached it. It keeps
    each CONNECT's lines."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, answer: str) -> None:
        super().__init__(("127.0.0.1", 0), TunnelProxy.Handler)
        self.answer = answer
        self.connects: list[list[str]] = []

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            lines = [self.rfile.readline().decode("latin-1").strip()]
            while lines[-1]:
                lines.append(self.rfile.readline().decode("latin-1").strip())
            assert isinstance(self.server, TunnelProxy)
            self.server.connects.append(lines[:-1])
            self.wfile.write(f"HTTP/1.1 {self.server.answer}\r\nContent-Length: 0\r\n\r\n".encode())


def test_status_behind_a_proxy_says_whether_the_endpoint_is_reached_through_it(daemon_factory: Any) -> None:
    """With ``HTTPS_PROXY`` set, the probe connected to the proxy and status said "cloud endpoint reachable"
    while the endpoint behind it was down (every call failing ``502 Bad Gateway`` from the proxy). The probe
    now asks the proxy for the tunnel the calls ask for (``CONNECT``, with the proxy URL's credentials), and
    status says what that found, naming the proxy (without its credentials)."""
    proxy = TunnelProxy("502 Bad Gateway")
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    port = proxy.server_address[1]
    try:
        config = {**cloud_config("https://cloud.example.com/v1"), "telemetry": {"probe_interval_s": 1}}
        env = {"HTTPS_PROXY": f"http://probe:s%40cret@127.0.0.1:{port}", "LOCOD_CLOUD_API_KEY": "sk-test"}
        handle = daemon_factory(config, extra_env=env)

        def telemetry() -> dict[str, Any]:
            return handle.client().status()["telemetry"]  # type: ignore[no-any-return]

        probed = wait_for(lambda: telemetry() if telemetry()["cloud_reachable"] is not None else None, 60, "a probe")
        # on the old code: reachable, as the proxy took the connection
        assert probed["cloud_reachable"] is False and probed["cloud_probed"] == "tunnel", probed
        assert probed["cloud_proxy"] == f"127.0.0.1:{port}"
        credentials = base64.b64encode(b"probe:s@cret").decode()
        assert proxy.connects[0][:2] == ["CONNECT cloud.example.com:443 HTTP/1.1", "Host: cloud.example.com:443"]
        assert f"Proxy-Authorization: Basic {credentials}" in proxy.connects[0]
        said = handle.cli("status").stdout
        assert f"cloud endpoint unreachable through proxy 127.0.0.1:{port}," in said and "s@cret" not in said, said
        proxy.answer = "200 Connection established"  # the endpoint back behind it
        wait_for(lambda: telemetry()["cloud_reachable"], 120, "a probe through the proxy to pass")
        assert f"cloud endpoint reachable through proxy 127.0.0.1:{port}," in handle.cli("status").stdout
    finally:
        proxy.shutdown()
        proxy.server_close()
