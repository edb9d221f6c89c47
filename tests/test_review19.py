"""Review 19: the session's last merges (walk 18, attack 18) read as their maintainer. Each test is an edge
the new code got wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from locod.daemon.config import load_config
from locod.daemon.reply import Reply
from locod.daemon.server import Daemon
from locod.protocol import ChatOptions, ChatRequest, DoneFrame, Frame

from .conftest import SECRET, cloud_config, write_config
from .test_routing import auto_config

DEAD_URL = "http://127.0.0.1:1/v1"  # nothing listens on port 1: every connection is refused at once
GONE_URL = "http://127.0.0.1:2/v1"  # the endpoint the reload removes (never called)


def test_status_counts_no_breaker_of_an_endpoint_a_reload_removed(daemon_factory: Any) -> None:
    """A reload keeps a removed endpoint's breaker (a turn still talking to it counts its failures there),
    and status and /metrics listed it among the daemon's endpoints: with the one endpoint left down, status
    read "breaker open for http://127.0.0.1:1/v1 (the other is closed)", an other there was not. Now they
    show the configured endpoints' breakers only."""
    config = cloud_config(DEAD_URL, mode="auto", breaker_failures=1, max_retries=0)
    gone = {**config["cloud"]["models"][0], "name": "cloud-gone", "base_url": GONE_URL}
    config["cloud"]["models"].append(gone)
    handle = daemon_factory(config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    client = handle.client()
    assert set(client.status()["cloud"]["breakers"]) == {DEAD_URL, GONE_URL}

    config["cloud"]["models"].pop()
    write_config(handle.config_path, config)
    assert client.reload()["reloaded"]
    turn = client.ask("Name a colour.", max_tokens=4, model="cloud-small")
    assert turn.done.location == "local"  # the endpoint refused it: the local model answered
    cloud = client.status()["cloud"]
    assert cloud["breakers"] == {DEAD_URL: "open"} and cloud["breaker"] == "open"
    out = handle.cli("status").stdout
    assert "breaker open;" in out and "the other is closed" not in out, out


def test_a_label_sent_as_soon_as_the_record_is_complete_corrects_the_queue(
    tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client has a turn's decision id from its first frame, and the log takes a label as soon as the
    turn's record is complete. The learner held a label for the turn's settling only from just before the
    done frame: one that came between the record and that (a grader labelling the streamed answer) trained
    at once, finding no prediction to correct, and the settling after it then moved the queue by the
    prediction, kept among the pending ones for a label that had come already. Now the turn waits for its
    settling from before its record is complete. The daemon is built in this process so that the label is
    sent, through the learner's own path, exactly there: while the turn records its session."""
    config_path = write_config(tmp_path / "config.toml", auto_config(DEAD_URL, sla=0.05))  # local answers
    dirs = {"STATE": tmp_path / "state", "RUNTIME": tmp_path / "run", "MODELS": models_dir}
    daemon = Daemon(load_config(config_path, env={f"LOCOD_{k}_DIR": str(v) for k, v in dirs.items()}))
    labels: list[dict[str, Any]] = []
    record = daemon.sessions.record

    def record_then_label(*args: Any, **kwargs: Any) -> None:
        labels.append(daemon.learner.feedback(daemon.records.newest(), True, "user"))
        record(*args, **kwargs)

    monkeypatch.setattr(daemon.sessions, "record", record_then_label)
    frames: list[Frame] = []
    try:
        request = ChatRequest("r", [{"role": "user", "content": "Hi"}], options=ChatOptions(max_tokens=2))
        daemon.runner.run(request, b"client", Reply(frames.append))
        done = frames[-1]
        assert isinstance(done, DoneFrame) and done.location == "local", frames
        assert labels and labels[0]["decision"] == done.decision
        with daemon.learner.lock:
            state = daemon.learner.mess.state
            assert done.decision not in state.pending  # the label, not the prediction, settled it
            assert state.satisfied_sum == pytest.approx(1.0)
    finally:
        daemon.close()
