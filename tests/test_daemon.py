"""The daemon end to end: a real subprocess, the real embedded model, a real socket and database."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from locod.client import Client
from locod.daemon.records import MIGRATIONS
from locod.errors import DaemonNotRunning, ProtocolError
from locod.protocol import ChatOptions, ChatRequest, DecisionFrame, DeltaFrame, DoneFrame, QueuedFrame

from .conftest import DaemonHandle, locod_command, start_daemon, wait_for

GREEDY = {"temperature": 0.0, "seed": 1}


def test_ask_streams_decision_deltas_done_and_records_the_turn(daemon: DaemonHandle) -> None:
    result = daemon.client().ask("Name one primary colour.", session="s1", max_tokens=24, **GREEDY)
    kinds = [f.type for f in result.frames]
    assert kinds[0] == "decision" and kinds[-1] == "done" and "delta" in kinds
    assert result.text.strip()
    assert result.decision.location == "local" and result.decision.model == "smollm2-135m-instruct"
    (row,) = daemon.rows()
    assert row["id"] == result.done.decision == result.decision.decision
    assert row["session"] == "s1" and row["turn"] == 0 and row["outcome"] == "ok"
    assert row["location"] == "local" and row["backend"] == "local"
    assert "no cloud model is configured" in row["reason"]
    assert 0 < row["tokens_out"] <= 24 and row["tokens_in"] > 0
    assert row["latency_total_ms"] > 0 and row["finished"] >= row["created"]
    assert row["prompt"] is None and len(row["prompt_sha256"]) == 64 and row["prompt_chars"] == 24
    assert '"cpu_pct"' in row["telemetry"]


def test_a_turn_is_committed_before_its_decision_frame_and_its_frames_keep_their_order(daemon: DaemonHandle) -> None:
    """The record is committed and ``decision`` sent on another thread than the one that reads the prompt
    and answers it: still, the record exists when ``decision`` arrives, every token's ``delta`` comes after
    it and before ``done``."""
    client = daemon.client()
    for n in range(4):
        frames = client.chat(f"Count from one to {n + 5}.", max_tokens=24, **GREEDY)
        decision = next(frames)
        assert isinstance(decision, DecisionFrame)
        assert daemon.rows("SELECT id FROM decisions WHERE id = ?", (decision.decision,))
        rest = list(frames)
        done = rest[-1]
        assert isinstance(done, DoneFrame) and all(isinstance(f, DeltaFrame) for f in rest[:-1])
        assert len(rest) - 1 == done.tokens_out > 0


def test_session_second_turn_sees_the_first(daemon: DaemonHandle) -> None:
    client = daemon.client()
    first = client.ask("My name is Zebulon. Remember it.", session="memory", max_tokens=16, **GREEDY)
    second = client.ask("What is my name?", session="memory", max_tokens=16, **GREEDY)
    other = client.ask("What is my name?", session="elsewhere", max_tokens=16, **GREEDY)
    rows = daemon.rows()
    assert [r["turn"] for r in rows] == [0, 1, 0]
    # The second turn's prompt carries the first exchange: more prompt tokens than the same question alone.
    assert second.done.tokens_in > other.done.tokens_in + first.done.tokens_out


def test_decisions_and_status_ops(daemon: DaemonHandle) -> None:
    client = daemon.client()
    client.ask("Hi", max_tokens=4, **GREEDY)
    client.ask("Hello", max_tokens=4, **GREEDY)
    recent = client.decisions(limit=1)
    assert len(recent) == 1 and recent[0]["id"] == 2
    status = client.status()
    assert status["local"]["resident"] == ["smollm2-135m-instruct"]
    assert status["turns_served"] == 2 and status["queue"]["in_flight"] == 0
    assert client.ping()["pong"] is True


def test_ping_and_status_answered_while_a_generation_runs(daemon: DaemonHandle) -> None:
    slow = daemon.client()
    frames = slow.chat("Write a long story about a lighthouse keeper.", max_tokens=300, temperature=0.0)
    assert next(frames).type == "decision"
    assert next(frames).type == "delta"  # generating now
    other = daemon.client()
    assert other.ping()["pong"]
    assert other.status()["queue"]["in_flight"] == 1
    rest = list(frames)
    assert rest[-1].type == "done"  # the slow turn was still running while the others were answered


def test_a_turn_waiting_for_the_local_model_is_told_when_it_asked(daemon: DaemonHandle) -> None:
    """A client that asked (options.queued) hears, before its decision, how many turns go first, and again
    as the queue moves; one that did not ask gets the frames it always got."""
    slow = daemon.client()
    frames = slow.chat("Write a long story about a lighthouse keeper.", max_tokens=300, temperature=0.0)
    assert next(frames).type == "decision"
    assert next(frames).type == "delta"  # the local model is busy now
    second = daemon.client().chat("Say hi.", max_tokens=2, queued=True)
    assert next(second) == QueuedFrame(1)
    third = daemon.client().chat("Say hello.", max_tokens=2, queued=True)
    assert next(third) == QueuedFrame(2)
    plain: list[Any] = []
    waiting = threading.Thread(target=lambda: plain.extend(daemon.client().chat("Say hey.", max_tokens=2)))
    waiting.start()
    status = daemon.client()
    wait_for(lambda: status.status()["queue"]["waiting_for_local"] == 3, 30, "the plain turn to queue")
    list(frames)  # the slow turn ends: the second takes the model, the third moves up
    after = list(second)
    assert after[0].type == "decision" and after[-1].type == "done"
    rest = list(third)
    assert rest[0] == QueuedFrame(1) and [f.type for f in rest][1:2] == ["decision"]
    waiting.join(60)
    assert plain[0].type == "decision" and not any(isinstance(f, QueuedFrame) for f in plain)
    assert len(daemon.rows()) == 4  # waiting recorded nothing: each record begins when its turn is accepted


def test_a_turn_that_waited_for_the_model_records_the_device_its_decision_saw(daemon_factory: Any) -> None:
    """A local turn's record is begun once the model is free, and it read the device then: a turn queued
    behind a long answer logged a sample taken after its decision (and `policy train --from-db` learned from
    it). Its record now holds the sample the decision read, taken before the wait began."""
    handle = daemon_factory({"telemetry": {"interval_s": 0.05}})
    frames = handle.client().chat("Write a long story about a lighthouse keeper.", max_tokens=200, temperature=0.0)
    assert [next(frames).type, next(frames).type] == ["decision", "delta"]  # the local model is busy now
    handle.client().ask("Say hi.", max_tokens=2)
    list(frames)
    waited = handle.rows()[-1]
    assert waited["latency_queue_ms"] > 200  # it waited many sampling intervals for the model
    taken = json.loads(waited["telemetry"])["taken"]
    assert 0 < taken <= waited["created"] - waited["latency_queue_ms"] / 1000


def test_prompts_are_stored_only_when_configured(daemon_factory: Any) -> None:
    handle = daemon_factory({"log": {"prompts": True}})
    handle.client().ask("Store me", max_tokens=2)
    assert handle.rows()[0]["prompt"] == "Store me"


def test_zoo_loads_on_demand_and_unloads_least_recently_used(daemon_factory: Any, models_dir: Path) -> None:
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    handle = daemon_factory(
        {
            # Room for about one model: loading the second unloads the first.
            "local": {
                "memory_budget_mb": 150,
                "models": [
                    {"name": "copy-a", "path": gguf, "n_ctx": 512},
                    {"name": "copy-b", "path": str(models_dir / gguf), "n_ctx": 512},
                ],
            },
        }
    )
    client = handle.client()
    assert client.status()["local"]["resident"] == ["smollm2-135m-instruct"]
    result = client.ask("Hi", model="copy-a", max_tokens=2)
    assert result.decision.model == "copy-a" and result.decision.reason == "the request named this local model"
    assert client.status()["local"]["resident"] == ["copy-a"]
    client.ask("Hi", model="copy-b", max_tokens=2)
    assert client.status()["local"]["resident"] == ["copy-b"]
    assert [r["model"] for r in handle.rows()] == ["copy-a", "copy-b"]


def test_socket_directory_and_file_modes(daemon: DaemonHandle) -> None:
    run = daemon.home / "run"
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    assert stat.S_IMODE((run / "locod.sock").stat().st_mode) == 0o600
    assert daemon.rows("PRAGMA journal_mode")[0]["journal_mode"] == "wal"
    assert daemon.rows("PRAGMA user_version")[0]["user_version"] == len(MIGRATIONS)


def test_second_daemon_on_same_runtime_dir_refuses(daemon: DaemonHandle, models_dir: Path) -> None:
    result = subprocess.run(
        locod_command("--config", str(daemon.config_path), "serve"),
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 4
    assert "another locod daemon is already running" in result.stderr
    assert daemon.client().ping()["pong"]  # the first one is untouched


def test_sigterm_exits_zero(daemon: DaemonHandle) -> None:
    daemon.client().ask("Hi", max_tokens=2)
    assert daemon.stop() == 0


def test_cli_ask_status_decisions(daemon: DaemonHandle) -> None:
    env = {**daemon.env}
    base = locod_command("--config", str(daemon.config_path))
    ask = subprocess.run(
        [*base, "ask", "-v", "Say hello", "--max-tokens", "8"], env=env, capture_output=True, text=True, timeout=120
    )
    assert ask.returncode == 0 and ask.stdout.strip()
    assert "[local: smollm2-135m-instruct" in ask.stderr
    status = subprocess.run([*base, "status"], env=env, capture_output=True, text=True, timeout=60)
    assert "routing  mode auto" in status.stdout and "local  smollm2-135m-instruct" in status.stdout
    table = subprocess.run([*base, "decisions"], env=env, capture_output=True, text=True, timeout=60)
    assert table.stdout.splitlines()[0].split()[:4] == ["id", "time", "session", "turn"]
    assert table.stdout.splitlines()[1].startswith("1 ")


def test_decisions_are_narrowed_by_session_location_outcome_and_since(daemon: DaemonHandle) -> None:
    """`locod decisions --session/--location/--outcome/--since` (and the op's fields) pick the records of
    one chat, or only the failures, from a log where the newest twenty are other turns; read from the file
    alike once the daemon is stopped."""
    client = daemon.client()
    for session in ("a", "b", "a"):
        client.ask("Hi", session=session, max_tokens=2)
    ids_of_a = [row["id"] for row in daemon.rows("SELECT id FROM decisions WHERE session = 'a' ORDER BY id DESC")]

    def ids(*args: str) -> list[int]:
        table = daemon.cli("decisions", *args)
        assert table.returncode == 0, table.stderr
        return [int(line.split()[0]) for line in table.stdout.splitlines()[1:]]

    assert ids("--session", "a") == ids_of_a[::-1] and len(ids_of_a) == 2
    assert len(ids("--location", "local", "--outcome", "ok", "--since", "1h")) == 3
    nothing = daemon.cli("decisions", "--location", "cloud")
    assert nothing.returncode == 0 and "no decision record matches" in nothing.stderr
    assert [r["id"] for r in client.decisions(session="a", limit=1)] == ids_of_a[:1]
    assert client.decisions(since=time.time() + 3600) == []
    wrong = daemon.cli("decisions", "--outcome", "good")
    assert wrong.returncode == 2 and "invalid choice: 'good'" in wrong.stderr
    daemon.stop()
    stopped = daemon.cli("decisions", "--session", "b", "--json")
    assert stopped.returncode == 0 and "read from" in stopped.stderr
    assert [row["session"] for row in json.loads(stopped.stdout)] == ["b"]


def test_missing_daemon_is_a_clear_message(tmp_path: Path) -> None:
    env = {**os.environ, "LOCOD_RUNTIME_DIR": str(tmp_path / "nothing"), "LOCOD_STATE_DIR": str(tmp_path)}
    result = subprocess.run(locod_command("ask", "hello"), env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 5
    assert result.stderr.strip() == (
        f"locod: locod is not running (no socket at {tmp_path}/nothing/locod.sock); start it with `locod serve`, "
        "`systemctl --user start locod` or `sudo systemctl start locod`"
    )


def test_a_socket_that_takes_connections_but_never_answers_is_said_to_hang(tmp_path: Path) -> None:
    """Not "start it with `locod serve`": something serves the socket (a stopped or stuck daemon), and a
    second daemon would be refused; the user is sent to its log."""
    sock = tmp_path / "locod.sock"
    ctx = zmq.Context.instance()
    dead = ctx.socket(zmq.ROUTER)
    dead.bind(f"ipc://{sock}")  # bound, but nobody answers
    try:
        client = Client(f"ipc://{sock}", timeout_s=0.5)
        try:
            client.ping()
            raise AssertionError("ping should not succeed")
        except DaemonNotRunning as exc:
            assert "the daemon may be stuck or stopped" in exc.message and "see its log" in exc.message
            assert "locod serve" not in exc.message
        finally:
            client.close()
    finally:
        dead.close(0)


def test_missing_model_file_fails_start_clearly(tmp_path: Path, models_dir: Path) -> None:
    handle = start_daemon(
        tmp_path,
        models_dir,
        {"local": {"default": "ghost", "models": [{"name": "ghost", "path": str(tmp_path / "nope.gguf")}]}},
        wait=False,
    )
    assert handle.proc.wait(60) == 3
    log = handle.log()
    assert f"model 'ghost': file {tmp_path / 'nope.gguf'} not found" in log and "Traceback" not in log


def test_corrupt_model_file_fails_start_clearly(tmp_path: Path, models_dir: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4096))
    handle = start_daemon(
        tmp_path, models_dir, {"local": {"default": "bad", "models": [{"name": "bad", "path": str(bad)}]}}, wait=False
    )
    assert handle.proc.wait(60) == 3
    assert f"model 'bad': {bad}: the GGUF header is damaged" in handle.log() and "Traceback" not in handle.log()
    not_gguf = tmp_path / "text.gguf"
    shutil.copy(__file__, not_gguf)
    handle = start_daemon(
        tmp_path / "2",
        models_dir,
        {"local": {"default": "t", "models": [{"name": "t", "path": str(not_gguf)}]}},
        wait=False,
    )
    assert handle.proc.wait(60) == 3
    assert "is not a GGUF file" in handle.log()


def test_restart_keeps_records_and_marks_nothing_interrupted(daemon_factory: Any) -> None:
    first = daemon_factory(name="same")
    first.client().ask("Hi", max_tokens=2)
    assert first.stop() == 0
    second = daemon_factory(name="same")
    second.client().ask("Hi again", max_tokens=2)
    assert [r["id"] for r in second.rows()] == [1, 2]
    assert second.client().status()["interrupted_at_start"] == 0
    wait_for(lambda: second.proc.poll() is None, 1)


def test_cli_chat_is_one_session(daemon: DaemonHandle) -> None:
    chat = subprocess.run(
        locod_command("--config", str(daemon.config_path), "chat", "--session", "cli"),
        env=daemon.env,
        input="Hello there\nWhat did I just say?\n\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert chat.returncode == 0, chat.stderr
    assert "session cli" in chat.stderr
    rows = daemon.rows()
    assert [(r["session"], r["turn"]) for r in rows] == [("cli", 0), ("cli", 1)]


BEFORE_QUEUED_FRAMES = "4eb82ae"  # the daemon as it was before `queued` frames (this repository's history)


def previous_release(tmp_path: Path) -> Path:
    """An import tree of locod at BEFORE_QUEUED_FRAMES, laid out as pyproject maps it (api/ is `locod`),
    to start that daemon with; skipped in a clone without that history."""
    repo = Path(__file__).resolve().parent.parent
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", BEFORE_QUEUED_FRAMES, "api", "daemon", "policy", "models"],
        capture_output=True,
    )
    if archive.returncode != 0:
        pytest.skip(f"this clone does not hold commit {BEFORE_QUEUED_FRAMES}")
    source = tmp_path / "source"
    source.mkdir()
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True)
    package = tmp_path / "tree" / "locod"
    shutil.copytree(source / "api", package)
    for part in ("daemon", "policy", "models"):
        (package / part).symlink_to(source / part)
    return package.parent


def test_a_newer_client_asks_an_older_daemon_without_queued_frames(tmp_path: Path, models_dir: Path) -> None:
    """An upgraded client meets a daemon that was not restarted: the daemon refuses the `queued` option it
    does not know before accepting anything, and the client asks again without it."""
    handle = start_daemon(tmp_path / "d", models_dir, extra_env={"PYTHONPATH": str(previous_release(tmp_path))})
    try:
        with Client(handle.endpoint) as client:
            with pytest.raises(ProtocolError, match="'queued'"):  # the older daemon indeed
                list(client.frames(client.send(queued_request()), 60_000))
            result = client.ask("Say hi.", max_tokens=2, queued=True)
            assert result.done.outcome in ("ok", "escalated") and len(handle.rows()) == 1
    finally:
        handle.stop()


def queued_request() -> ChatRequest:
    options = ChatOptions(max_tokens=2, queued=True)
    return ChatRequest("raw", [{"role": "user", "content": "Say hi."}], None, None, [], options, None)
