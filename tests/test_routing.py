"""MESS+ routing in the running daemon: what the record keeps, feedback through the socket and the CLI,
state across a real restart, a corrupt state file, and the judge."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from locod.errors import UnknownDecision

from .conftest import cloud_config, locod_command, wait_for
from .faultproxy import FaultProxy


def auto_config(base_url: str, **routing: Any) -> dict[str, Any]:
    """The loopback cloud, routed. weight_policy 0: the shipped policy is loaded and recorded, but MESS+'s
    arithmetic alone decides, so these tests can follow it by hand (the combined rule is tested in
    test_policy.py)."""
    config = cloud_config(base_url, mode="auto", timeout_s=60.0)
    # shadow off: labels come only from where a test puts them; escalation off: the decision is where the turn
    # is answered (shadow answers and escalation have their own tests)
    rules = {"sla": 0.8, "explore_c": 0.0, "weight_policy": 0.0, "shadow": "off", "escalate": False}
    config["routing"].update({**rules, **routing})
    return config


def test_auto_turns_record_the_messplus_state(daemon_factory: Any, proxy: FaultProxy) -> None:
    handle = daemon_factory(auto_config(proxy.base_url))  # no labels: the predictions stand
    client = handle.client()
    first = client.ask("Hi", max_tokens=2)
    reason = first.decision.reason  # in words, with the numbers it was decided on
    assert "the best trade of predicted satisfaction for cost" in reason and "SLA 0.80, Q 0.00" in reason
    assert "cloud-small: " in reason or first.decision.location == "cloud"
    assert "% likely good at relative cost" in reason
    row = handle.rows()[0]
    assert row["sla"] == 0.8 and row["v"] == 20.0 and row["q"] == 0.0 and row["explored"] == 0
    # One s_hat and cost per allowed action: without attachments the cloud model is offered text only.
    s_hat = json.loads(row["s_hat"])
    assert set(s_hat) == {"smollm2-135m-instruct", "cloud-small|cloud"}
    # The embedded model starts from the predictor prior shipped for its GGUF (warm start), the cloud from 0.85.
    s_local = s_hat["smollm2-135m-instruct"]
    assert s_local != pytest.approx(0.5) and 0 < s_local < 0.8 and s_hat["cloud-small|cloud"] == pytest.approx(0.85)
    costs = json.loads(row["costs"])
    assert costs["cloud-small|cloud"] == 1.0 and 0 < costs["smollm2-135m-instruct"] < 1
    mask = json.loads(row["mask"])
    assert mask["smollm2-135m-instruct"] and mask["cloud-small|cloud"]
    assert not mask["cloud-small|cloud+0"]  # no attachment in slot 0 to send
    assert set(json.loads(row["probabilities"])) == {"local", "cloud"} and row["policy_version"]
    features = json.loads(row["features"])
    assert features["task"] == "chat" and features["hashed"]
    # The price rule (docs/routing.md): with s_local predicted locally and 0.85 in the cloud, alpha 0.8 needs
    # the cloud on (0.8 - s_local) / (0.85 - s_local) of the turns, and the signed queue keeps the mix there
    # (the paper's rule with V = 1 stayed local for the first 10 turns while Q built up).
    locations = [client.ask(f"Question {i}", max_tokens=2).decision.location for i in range(12)]
    needed = 12 * (0.8 - s_local) / (0.85 - s_local)
    assert needed - 2 <= locations.count("cloud") <= min(12, needed + 2)
    wait_for(lambda: client.status()["routing"]["turns"] == 13, 10, "the last turn to settle")  # after `done`
    assert client.status()["routing"]["q"] < 1.0  # kept from the first turn: the paper's Q built up to ~3 here


def test_feedback_through_socket_and_cli(daemon_factory: Any, proxy: FaultProxy) -> None:
    handle = daemon_factory(auto_config(proxy.base_url))
    client = handle.client()
    decision = client.ask("Hi", max_tokens=2).done.decision
    q_before = client.status()["routing"]["q"]
    result = subprocess.run(
        locod_command("--config", str(handle.config_path), "feedback", str(decision), "good"),
        env=handle.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and f"decision {decision} labelled good" in result.stdout
    row = handle.rows()[0]
    assert row["satisfied"] == 1 and row["label_source"] == "user" and row["labelled"] is not None
    status = client.status()["routing"]
    assert status["labels"][row["model"]] == 1  # the model that answered
    predicted = json.loads(row["s_hat"])[row["action"]]
    assert status["q"] == pytest.approx(max(0.0, q_before + predicted - 1.0))  # the prediction replaced by 1
    with pytest.raises(UnknownDecision) as info:
        client.feedback(decision, False)
    assert info.value.code == "already_labelled"
    again = subprocess.run(
        locod_command("--config", str(handle.config_path), "feedback", str(decision), "bad"),
        env=handle.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 1 and "already labelled good (by user); a label is final" in again.stderr


def test_a_label_for_a_turn_still_running_is_refused_and_one_right_after_done_still_moves_the_queue(
    daemon_factory: Any, proxy: FaultProxy
) -> None:
    handle = daemon_factory(auto_config(proxy.base_url))
    client, labeller = handle.client(), handle.client()
    client.ask("Hi", max_tokens=2)
    wait_for(lambda: client.status()["routing"]["turns"] == 1, 10, "the turn to settle")
    before = client.status()["routing"]["pending_labels"]
    frames = client.chat("Tell me about the history of Rome in detail.", max_tokens=24)
    decision = next(frames)
    assert decision.type == "decision"
    with pytest.raises(UnknownDecision, match="is still running; label it once it has answered") as info:
        labeller.feedback(decision.decision, True)
    assert info.value.code == "not_finished"
    frames_left = list(frames)
    assert frames_left[-1].type == "done"
    labeller.feedback(decision.decision, True)  # at once after done: before or after the turn settles
    wait_for(lambda: client.status()["routing"]["turns"] == 2, 10, "the turn to settle")
    routing = client.status()["routing"]
    assert routing["pending_labels"] == before and sum(routing["labels"].values()) == 1  # nothing stale left


def test_routing_state_survives_a_daemon_restart(daemon_factory: Any, proxy: FaultProxy) -> None:
    config = auto_config(proxy.base_url)
    first = daemon_factory(config, name="same")
    client = first.client()
    decisions = [client.ask(f"Hello {i}", max_tokens=2).done.decision for i in range(3)]
    wait_for(lambda: client.status()["routing"]["turns"] == 3, 10, "the turns to settle")  # after `done`
    client.feedback(decisions[0], True)
    before = client.status()["routing"]
    assert first.stop() == 0
    second = daemon_factory(config, name="same")
    after = second.client().status()["routing"]
    for key in ("q", "turns", "attained", "labels", "pending_labels"):
        assert after[key] == before[key], key
    second.client().feedback(decisions[1], False)  # a label for a turn settled before the restart
    assert second.client().status()["routing"]["pending_labels"] == before["pending_labels"] - 1


def test_corrupt_state_file_at_start(daemon_factory: Any, tmp_path: Any) -> None:
    state = tmp_path / "d" / "state"
    state.mkdir(parents=True)
    (state / "messplus.npz").write_bytes(b"\x00garbage")
    handle = daemon_factory()
    assert handle.client().ask("Hi", max_tokens=2).done.outcome == "ok"
    assert "MESS+ state" in handle.log() and "is unusable" in handle.log()
    assert list(state.glob("messplus.npz.bad-*"))


def test_judge_labels_explored_turns(daemon_factory: Any, proxy: FaultProxy) -> None:
    handle = daemon_factory(auto_config(proxy.base_url, judge=True, explore_c=10.0))  # every turn explores
    client = handle.client()
    ids = [
        client.ask(q, max_tokens=8, temperature=0.0, seed=1).done.decision
        for q in ("What is 2+2?", "Capital of France?", "Say hi")
    ]

    def settled() -> bool:
        rows = {r["id"]: r for r in handle.rows()}
        log = handle.log()
        return all(
            rows[i]["label_source"] == "judge"
            or f"judge gave no verdict for decision {i}" in log
            or f"judge could not grade decision {i}" in log
            for i in ids
        )

    wait_for(settled, 120, "the judge")  # each explored turn: a verdict as its label, or why there is none
    rows = {r["id"]: r for r in handle.rows()}
    assert all(rows[i]["explored"] == 1 for i in ids)  # explored at its decision or at its answer's checkpoint
    grading = [s for s in proxy.chat_requests() if s.body["messages"][0]["content"].startswith("You grade answers")]
    assert grading  # they went to the judge
    # The judge here is the 135M model, which often answers neither YES nor NO; what verdicts it gives label
    # explored turns only, and the grading call is paid for by its turn.
    judged = [r for r in rows.values() if r["label_source"] == "judge"]
    assert all(r["explored"] == 1 and r["cost_usd"] > 0 for r in judged)
