"""Round seven of attacks on a running daemon, on a turn's lifecycle and the state kept across faults:
each test is one way in that broke, and now holds."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from locod.errors import UnknownDecision
from locod.protocol import ChatOptions, ChatRequest, encode_request

from .conftest import REPO, SECRET, cloud_config, wait_for, write_config
from .faultproxy import Fault, FaultProxy
from .test_routing import auto_config


def _settled(handle: Any) -> int:
    return int(handle.client().status()["routing"]["turns"])


def test_a_reload_keeps_the_router_state_a_refused_save_left_in_memory(daemon_factory: Any) -> None:
    """While the router state could not be saved (a full disk; here its temporary file's name is taken), a
    reload re-read the file and threw away every turn learned since its last save. Now a reload carries on
    from the state in memory, which is saved once the disk lets it."""
    handle = daemon_factory()
    client = handle.client()
    assert client.ask("Say hi.", max_tokens=2).done is not None
    wait_for(lambda: _settled(handle) == 1, what="the first turn to settle")
    blocker = handle.home / "state" / "messplus.tmp"
    blocker.mkdir()  # every save fails from now on, as on a full disk
    for prompt in ("Say hello.", "Say yes."):
        assert client.ask(prompt, max_tokens=2).done is not None
    wait_for(lambda: _settled(handle) == 3, what="the turns to settle")
    assert "cannot save the MESS+ state" in handle.log()
    assert client.reload()["reloaded"]
    assert _settled(handle) == 3
    blocker.rmdir()
    assert client.ask("Say no.", max_tokens=2).done is not None
    handle.stop()
    assert _settled(daemon_factory()) == 4  # the whole state reached the disk once it could


def test_a_label_for_a_turn_from_before_a_restart_trains_the_router(daemon_factory: Any) -> None:
    """A label for a turn whose settling the router state no longer holds (the daemon was killed before its
    save, or the state file was unusable and set aside) was held for a settling that never comes: recorded
    as final, never trained on. Now a label for a turn of an earlier start trains at once."""
    handle = daemon_factory()
    decision = handle.client().ask("Say hi.", max_tokens=2).done.decision
    handle.stop()
    (handle.home / "state" / "messplus.npz").write_bytes(b"not a zip")  # set aside at the next start
    restarted = daemon_factory()
    client = restarted.client()
    assert client.status()["routing"]["labels"] == {}
    client.feedback(decision, True)
    assert sum(client.status()["routing"]["labels"].values()) == 1


def test_a_fifo_as_the_router_state_is_set_aside_without_waiting(daemon_factory: Any, tmp_path: Path) -> None:
    """A FIFO (or another special file) at messplus.npz held the start in open() for good: no socket, no
    READY, a restart loop under systemd. Now it is set aside with one log line and the daemon serves."""
    state = tmp_path / "d" / "state"
    state.mkdir(parents=True)
    os.mkfifo(state / "messplus.npz")  # nobody ever writes to it
    handle = daemon_factory()
    assert handle.client().ask("Say hi.", max_tokens=2).done is not None
    assert "unusable" in handle.log() and "not a regular file" in handle.log()
    assert len(list(state.glob("messplus.npz.bad-*"))) == 1


@pytest.fixture
def park(tmp_path: Path) -> Iterator[Path]:
    """The daemon's disk park (state/kvcache) on a file system of its own, to be made read-only."""
    mount = tmp_path / "d" / "state" / "kvcache"
    mount.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_read_only_park_still_resumes_its_dialogues(daemon_factory: Any, park: Path) -> None:
    """A parked dialogue resumed after a restart has its file removed; on a park made read-only meanwhile
    the removal raised, and every turn of that dialogue failed with an internal error until the park was
    writable again. Now the state is used, the file left with one log line."""
    config = {"local": {"cache_disk_mb": 32}}
    handle = daemon_factory(config)
    assert handle.client().ask("Say hi.", session="s1", max_tokens=2).done is not None
    assert handle.stop() == 0
    assert len(list(park.glob("*.kv"))) == 1  # parked at the stop
    subprocess.run(["mount", "-o", "remount,ro", str(park)], check=True)
    restarted = daemon_factory(config)
    client = restarted.client()
    assert client.ask("Say hello.", session="s1", max_tokens=2).done.outcome == "ok"
    assert client.status()["local"]["cache"]["disk_hits"] == 1
    assert "could not remove parked KV state" in restarted.log()
    assert "internal error" not in restarted.log()


def test_a_directory_in_the_park_does_not_fail_the_parking(daemon_factory: Any, tmp_path: Path) -> None:
    """The park is trimmed to its limit by deleting its oldest files; a directory named like one (``*.kv``)
    was counted and "deleted", which raised, failing the stop's parking of every dialogue after it. Now
    only regular files count."""
    park = tmp_path / "d" / "state" / "kvcache"
    (park / "0000.kv").mkdir(parents=True)
    os.utime(park / "0000.kv", (0, 0))  # the oldest: the first the trimming takes
    handle = daemon_factory({"local": {"cache_disk_mb": 1}})
    client = handle.client()
    for session in ("s1", "s2"):
        assert client.ask("Say hi.", session=session, max_tokens=2).done is not None
    assert handle.stop(signal.SIGTERM) == 0
    assert "Traceback" not in handle.log()
    assert (park / "0000.kv").is_dir()


def test_a_cancelled_turn_cannot_be_labelled(daemon: Any) -> None:
    """A turn cancelled mid-answer (its client gone) took a label as final, though its answer was cut and
    the turn never settled: the label was held for that settling and never trained on, nor could a second
    label replace it. Now it is refused as a turn that ended without an answer."""
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.connect(daemon.endpoint)
        ask = [{"role": "user", "content": "Write a long story about a lighthouse."}]
        sock.send(encode_request(ChatRequest("gone", ask, options=ChatOptions(max_tokens=1000))))
        frames = [json.loads(sock.recv()) for _ in range(2)]  # the decision, then the first delta
        assert [f["type"] for f in frames] == ["decision", "delta"]
        sock.close(linger=0)
    finally:
        ctx.destroy(linger=0)
    (row,) = wait_for(lambda: [r for r in daemon.rows() if r["outcome"] != "pending"], 60, "the turn to end")
    assert row["outcome"] == "cancelled"
    with pytest.raises(UnknownDecision) as refused:
        daemon.client().feedback(row["id"], True)
    assert refused.value.code == "not_answered" and "cancelled" in refused.value.message


def test_a_stop_during_a_shadow_answer_stops_cleanly(daemon_factory: Any) -> None:
    """The stop waited 10 s for a shadow answer (the local model answering a cloud turn in the background),
    then closed the model under it: the daemon died of SIGSEGV, its router state unsaved. Now the shadow
    answer stops at its next token and the daemon stops as it should."""
    proxy = FaultProxy("http://127.0.0.1:9").start()  # made-up answers only: nothing is forwarded
    try:
        config = cloud_config(proxy.base_url, max_retries=0)
        config["routing"]["shadow"] = "always"
        handle = daemon_factory(config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
        proxy.set(Fault("endless"))  # a long cloud answer at once, so the shadow answer is long too
        done = handle.client(turn_timeout_s=120).ask("Count from 1 to 3000, separated by commas.", max_tokens=3000).done
        assert done.location == "cloud"
        time.sleep(1)  # the shadow answer is under way
        assert handle.stop() == 0
    finally:
        proxy.stop()
    assert "stopped after 1 turns" in handle.log()


def test_a_park_folder_that_cannot_be_made_leaves_the_park_off(daemon_factory: Any, tmp_path: Path) -> None:
    """A file where the disk park's folder goes (state/kvcache) refused the start ("File exists", exit 1),
    which systemd's Restart=on-failure retries for ever. The park only saves re-reading a dialogue: now the
    daemon serves without it, and says so once."""
    state = tmp_path / "d" / "state"
    state.mkdir(parents=True)
    (state / "kvcache").write_text("not a folder")
    handle = daemon_factory({"local": {"cache_disk_mb": 8}})
    assert handle.client().ask("Say hi.", session="s1", max_tokens=2).done is not None
    assert handle.log().count("serving without the disk park") == 1
    assert handle.stop() == 0


def test_training_a_policy_never_rewrites_the_one_a_daemon_reads(daemon_factory: Any, tmp_path: Path) -> None:
    """`locod policy train` wrote the state directory's policy.onnx in place, twice (the export, then again
    with its metadata): a daemon starting or reloading meanwhile read half a file or one without its
    layout, and training killed mid-write left no policy at all. Now the new policy is renamed over the old
    one whole: whoever opened the old file reads it whole."""
    pytest.importorskip("torch")
    policy = tmp_path / "d" / "state" / "policy.onnx"
    policy.parent.mkdir(parents=True)
    shipped = (REPO / "policy" / "default" / "policy.onnx").read_bytes()
    policy.write_bytes(shipped)
    handle = daemon_factory()
    client = handle.client()
    before = client.status()["routing"]["policy"]
    with policy.open("rb") as reading:  # as a daemon's start or reload holds it
        trained = handle.cli("policy", "train", "--steps", "512", timeout=600)
        assert trained.returncode == 0, trained.stderr
        assert reading.read() == shipped
    reloaded = client.reload()
    assert reloaded["reloaded"] and reloaded["policy_error"] is None
    assert client.status()["routing"]["policy"] != before
    assert [p.name for p in policy.parent.glob("*policy.onnx*")] == ["policy.onnx"]


def test_a_park_file_half_written_by_a_killed_daemon_is_cleared(daemon_factory: Any, tmp_path: Path) -> None:
    """A daemon killed while parking a dialogue (systemd's stop timeout, kill -9) left its temporary file,
    which the park's byte limit never counted nor removed: each such kill kept up to the limit more on disk.
    Now the next start removes it."""
    park = tmp_path / "d" / "state" / "kvcache"
    park.mkdir(parents=True)
    (park / "0123456789abcdef0123456789abcdef.tmp").write_bytes(b"\0" * (1 << 20))
    handle = daemon_factory({"local": {"cache_disk_mb": 1}})
    assert handle.client().ask("Say hi.", session="s1", max_tokens=2).done is not None
    assert list(park.glob("*.tmp")) == []


def test_a_judge_that_cannot_write_its_cost_still_counts_it_and_says_so(daemon_factory: Any, proxy: FaultProxy) -> None:
    """The judge grades an explored turn after its reply, on a thread of its own, and adds its price to the
    turn's record. With the decision log locked (or a full disk) that write raised on the judge's thread,
    where nobody saw it: the money went uncounted by the daily cap, and the verdict was dropped without a
    word. Now the spend counts whatever the disk says, and what could not be stored is logged. (What the call
    may cost is written to the record before it, tests/test_ops26.py: as the lock comes before or after that
    write, the record ends with that most it may cost, or without the judge's cost; today's spend has it.)"""
    handle = daemon_factory(auto_config(proxy.base_url, judge=True, explore_c=10.0))  # every turn explores
    client = handle.client()
    proxy.set(Fault("delay", delay_s=2))  # the grading call, sent after the reply, answers late
    done = client.ask("What is 2+2?", max_tokens=4, temperature=0.0).done
    decision = done.decision
    holder = sqlite3.connect(handle.db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # before the judge answers: its cost cannot be written
    try:
        wait_for(lambda: f"judge's cost for decision {decision} is not in its record" in handle.log(), 60)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert client.status()["cloud"]["spent_today_usd"] > round(done.cost_usd, 6)  # the turn's, and the judge's


def test_gradings_waiting_for_the_judge_are_bounded_and_dropped_at_stop(
    tmp_path: Path, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """With the judge on and a cloud that does not answer, every explored turn queued a grading: memory
    without bound, and a stop that ran them all, each up to the cloud's timeout. At most MAX_JUDGING wait;
    past that a turn is not judged (said in the log), and the stop drops the queued ones. The learner runs
    in this process against the real loopback cloud, its fault proxy holding every grading."""
    from locod.daemon.cloud import CloudBackend
    from locod.daemon.config import EMBEDDED_MODEL, load_config
    from locod.daemon.decision import Decision, Routing
    from locod.daemon.learner import MAX_JUDGING, Learner
    from locod.daemon.records import DecisionLog
    from locod.policy.messplus import RecordedFeatures, TurnFeatures

    config = auto_config(proxy.base_url, judge=True)
    config["cloud"].update(timeout_s=1.0, max_retries=0)
    config["paths"] = {"state_dir": str(tmp_path / "state"), "models_dir": str(tmp_path / "models")}
    loaded = load_config(write_config(tmp_path / "config.toml", config), env={"LOCOD_CLOUD_API_KEY": SECRET})
    records = DecisionLog(tmp_path / "state" / "locod.db")
    learner = Learner(loaded, records, CloudBackend(loaded.cloud, loaded.source))
    proxy.set(Fault("delay", delay_s=30.0))  # no grading is answered within the cloud's timeout
    features = RecordedFeatures.of(TurnFeatures(prompt="What is 2+2?", task="math"))
    routing = Routing(EMBEDDED_MODEL.name, features, 0.0, 0.8, 20.0, {EMBEDDED_MODEL.name: 0.5}, {}, {}, {}, None)
    explored = Decision("local", EMBEDDED_MODEL.name, (), "explored", explored=True, routing=routing)
    with caplog.at_level("WARNING", logger="locod.daemon.learner"):
        for decision_id in range(1, MAX_JUDGING + 11):
            learner.settle(decision_id, explored, "What is 2+2?", "4")
    assert f"is not judged: {MAX_JUDGING} gradings wait" in caplog.text
    learner.close()  # the grading under way ends at the timeout; the others are dropped
    records.close()
    assert len(proxy.chat_requests()) <= 2, len(proxy.chat_requests())


def test_a_stop_leaves_the_grading_under_way(tmp_path: Path, proxy: FaultProxy) -> None:
    """A stop waited for the grading under way until the cloud answered or timed out (`cloud.timeout_s`, and a
    retry each): with an endpoint that says nothing, systemd's stop timeout (40 s) killed the daemon before
    it saved its routing state. The grading now leaves its call: no verdict, the stop goes on."""
    from locod.daemon.cloud import CloudBackend
    from locod.daemon.config import load_config
    from locod.daemon.learner import Learner
    from locod.daemon.records import DecisionLog

    config = auto_config(proxy.base_url, judge=True)
    config["cloud"].update(timeout_s=600.0, deadline_s=1200.0, max_retries=0)
    config["paths"] = {"state_dir": str(tmp_path / "state"), "models_dir": str(tmp_path / "models")}
    loaded = load_config(write_config(tmp_path / "config.toml", config), env={"LOCOD_CLOUD_API_KEY": SECRET})
    records = DecisionLog(tmp_path / "state" / "locod.db")
    learner = Learner(loaded, records, CloudBackend(loaded.cloud, loaded.source))
    proxy.set(Fault("delay", delay_s=600.0))
    verdicts: list[bool | None] = []
    grading = threading.Thread(target=lambda: verdicts.append(learner.judge("What is 2+2?", "4", 1)))
    grading.start()
    wait_for(lambda: proxy.chat_requests(), 60, "the grading to reach the cloud")
    closing = threading.Thread(target=learner.close)
    closing.start()
    closing.join(120)  # the endpoint would hold it 600 s
    grading.join(60)
    assert not closing.is_alive() and verdicts == [None]
    records.close()
