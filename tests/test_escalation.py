"""Answer locally, escalate if unsure (issue #18): the local model's answer is held back until its first
tokens are judged by its own confidence, then shown, or dropped and the turn sent to the cloud; the client
never sees text of a dropped answer. Real model, real loopback cloud, real log-probs from llama.cpp."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import openai
from llama_cpp import Llama, LogitsProcessorList

from locod.daemon.logprobs import TokenLogprobs
from locod.policy import rule
from locod.policy.confidence import FEATURES, ConfidenceHead
from locod.policy.messplus import MessPlus
from locod.protocol import Attachment, DecisionFrame, DeltaFrame, DoneFrame, EscalatedFrame, FallbackFrame

from .conftest import cloud_config, free_port, wait_for
from .faultproxy import Fault, FaultProxy

LOCAL, CLOUD = "smollm2-135m-instruct", "cloud-small"
QUESTION = [{"role": "user", "content": "What is the plural of mouse?"}]


def test_token_logprobs_equal_what_llama_cpp_reports_with_logits_all(model_path: Path) -> None:
    llm = Llama(str(model_path), n_ctx=256, logits_all=True, verbose=False)
    reported = llm.create_chat_completion(
        messages=QUESTION, max_tokens=12, temperature=0.0, logprobs=True, top_logprobs=1
    )
    expected = [(t["token"], t["logprob"]) for t in reported["choices"][0]["logprobs"]["content"]]  # type: ignore[index]
    read = TokenLogprobs(llm)
    chunks = llm.create_chat_completion(
        messages=QUESTION, max_tokens=12, temperature=0.0, stream=True, logits_processor=LogitsProcessorList([read])
    )
    assert sum(1 for _ in chunks) > 3
    got = [(llm.detokenize([token]).decode(), lp) for token, lp in read.tokens()]
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert np.allclose([lp for _, lp in got], [lp for _, lp in expected], atol=1e-3)


def test_a_local_answer_escalates_when_the_cloud_adds_more_satisfaction_than_it_costs() -> None:
    assert rule.escalates(margin=0.5, price=2.0, s_cloud=0.9, s_local=0.2)  # 0.5 < 2 * 0.7
    assert not rule.escalates(margin=0.5, price=2.0, s_cloud=0.9, s_local=0.8)  # 0.5 > 2 * 0.1
    assert not rule.escalates(margin=0.5, price=0.0, s_cloud=0.9, s_local=0.0)  # satisfaction is free: keep


def _head(min_weight: float, bias: float) -> ConfidenceHead:
    """A confidence head that ignores the prompt (a = 0) and reads only the answer's least likely token."""
    weights = np.zeros(len(FEATURES) + 2)
    weights[1 + FEATURES.index("min")] = min_weight
    weights[-1] = bias
    return ConfidenceHead(weights)


def _daemon(
    daemon_factory: Any,
    tmp_path: Path,
    proxy: FaultProxy,
    head: ConfidenceHead,
    name: str,
    routing: dict[str, Any] | None = None,
    **sections: Any,
) -> Any:
    """A daemon that routes (no exploration, no policy term, a demanding SLA and a queue behind it, so the
    cloud is worth its cost to an unsure answer; ``routing`` changes that), whose local model's confidence
    head is ``head`` (it has a label, so the shipped prior does not replace it)."""
    config = cloud_config(proxy.base_url, mode="auto", timeout_s=60.0)
    config["routing"].update(sla=0.99, explore_c=0.0, weight_policy=0.0, shadow="off", escalate_tokens=6)
    config["routing"].update(routing or {})
    config.update(sections)
    mess = MessPlus(
        rule.priors([LOCAL], [CLOUD]), sla=0.99, v=20.0, explore_c=0.0, q_cap=50.0,
        path=tmp_path / name / "state" / "messplus.npz",
    )  # fmt: skip
    mess.state.confidence[LOCAL] = head
    mess.state.labels[LOCAL] = 1
    mess.state.q = mess.state.z = 20.0  # satisfaction is behind the SLA: it is worth Z / V = 1 cost unit
    mess.path.parent.mkdir(parents=True)  # type: ignore[union-attr]
    mess.save()
    return daemon_factory(config, name=name)


def test_an_unsure_local_answer_is_never_shown_and_the_cloud_answers(
    daemon_factory: Any, tmp_path: Path, proxy: FaultProxy
) -> None:
    # Sure only if no token of the answer had a log-prob below -0.01: no real answer is that sure,
    # yet the most confident answer the head can describe is, so the turn tries the local model first.
    handle = _daemon(daemon_factory, tmp_path, proxy, _head(min_weight=1000.0, bias=10.0), "unsure")
    frames = list(handle.client().chat("What is the plural of mouse?", max_tokens=24, temperature=0.0))
    decision, escalated = frames[0], next(f for f in frames if isinstance(f, EscalatedFrame))
    assert isinstance(decision, DecisionFrame) and decision.location == "local" and "escalates to" in decision.reason
    assert not any(isinstance(f, DeltaFrame) for f in frames[: frames.index(escalated)])  # nothing local shown
    assert escalated.model == CLOUD and escalated.confidence < 0.5 and "not sure enough" in escalated.message
    done = frames[-1]
    assert isinstance(done, DoneFrame) and done.outcome == "escalated" and done.location == "cloud"
    assert any(isinstance(f, DeltaFrame) and f.text for f in frames[frames.index(escalated) :])

    row = handle.rows()[0]
    assert (row["outcome"], row["location"], row["backend"], row["model"]) == ("escalated", "local", "cloud", CLOUD)
    judged = json.loads(row["confidence"])
    assert judged["model"] == LOCAL and judged["kept"] is False and isinstance(judged["label"], bool)
    assert len(judged["features"]) == len(FEATURES) and judged["s_answered"] < 0.5
    assert row["energy_j"] > 0 and row["cost_usd"] > 0  # the local answer's energy and the cloud's price
    routing = handle.client().status()["routing"]
    assert routing["labels"][LOCAL] == 2  # the local answer, graded against the cloud's, labelled the model
    assert routing["escalated_labels"] == 1 and "1 escalation label" in handle.cli("status").stdout


def _wait_for_local_confidence_labels(home: Path, count: int) -> None:
    """Until the saved state counts ``count`` labels on the local model's confidence head. A label that comes
    before its turn settles (learning runs after the reply) is applied at the settling: on a loaded machine,
    after `feedback` has answered."""

    def seen() -> int:
        state = np.load(home / "state" / "messplus.npz")
        return int(dict(zip(state["conf_names"].tolist(), state["conf_seen"].tolist()))[LOCAL])

    wait_for(lambda: seen() == count, what=f"{count} label(s) on the local confidence head")


def test_a_sure_local_answer_is_shown_whole_and_its_label_trains_the_confidence_head(
    daemon_factory: Any, tmp_path: Path, proxy: FaultProxy
) -> None:
    handle = _daemon(daemon_factory, tmp_path, proxy, _head(min_weight=0.0, bias=10.0), "sure")
    client = handle.client()
    forced = client.ask("What is the plural of mouse?", max_tokens=24, temperature=0.0, force="local")
    result = client.ask("What is the plural of mouse?", max_tokens=24, temperature=0.0)
    assert result.escalated is None and result.done.outcome == "ok" and result.done.location == "local"
    assert "escalates to" in result.decision.reason
    assert result.text == forced.text  # held back, then shown: the same answer as an unjudged one

    row = next(r for r in handle.rows() if r["id"] == result.done.decision)
    judged = json.loads(row["confidence"])
    assert judged["kept"] is True and judged["s_answered"] > 0.9 and judged["label"] is None
    client.feedback(result.done.decision, False)
    _wait_for_local_confidence_labels(tmp_path / "sure", 1)  # the user's label trained the head on this answer


def test_an_exploration_at_the_checkpoint_is_recorded_and_graded_by_the_judge(
    daemon_factory: Any, tmp_path: Path, proxy: FaultProxy
) -> None:
    """With escalation the rule chooses at the answer's checkpoint, so that is where a turn explores: the
    record says so and the judge grades the turn, as it grades any explored turn."""
    head = _head(min_weight=0.0, bias=10.0)
    handle = _daemon(daemon_factory, tmp_path, proxy, head, "explores", routing={"explore_c": 10.0, "judge": True})
    result = handle.client().ask("What is the plural of mouse?", max_tokens=24, temperature=0.0)
    assert not result.decision.explored and "escalates to" in result.decision.reason  # planned, not yet chosen
    row = handle.rows()[0]
    assert row["explored"] == 1 and json.loads(row["confidence"])["explored"] is True

    def graded() -> bool:
        return any(s.body["messages"][0]["content"].startswith("You grade answers") for s in proxy.chat_requests())

    wait_for(graded, 60, "the judge's grading call")


def test_escalation_can_be_switched_off(daemon_factory: Any, proxy: FaultProxy) -> None:
    config = cloud_config(proxy.base_url, mode="auto", timeout_s=60.0)
    config["routing"].update(explore_c=0.0, shadow="off", escalate=False)
    handle = daemon_factory(config)
    result = handle.client().ask("Hello", max_tokens=4)
    assert "escalates" not in result.decision.reason and handle.rows()[0]["confidence"] is None


def test_a_cloud_that_fails_after_an_escalation_hands_the_turn_back_to_the_local_model(
    daemon_factory: Any, tmp_path: Path, proxy: FaultProxy
) -> None:
    handle = _daemon(daemon_factory, tmp_path, proxy, _head(min_weight=1000.0, bias=10.0), "failing")
    proxy.set(Fault("status", status=500))
    frames = list(handle.client().chat("What is the plural of mouse?", max_tokens=24, temperature=0.0))
    kinds = [f.type for f in frames]
    assert kinds.index("escalated") < kinds.index("fallback") < kinds.index("delta")  # no text before either
    done = frames[-1]
    assert isinstance(done, DoneFrame) and done.outcome == "fallback" and done.location == "local"
    row = handle.rows()[0]
    assert row["outcome"] == "fallback" and row["backend"] == "local"
    assert json.loads(row["confidence"])["kept"] is False
    assert "from the start" in next(f for f in frames if isinstance(f, FallbackFrame)).message  # cut: made again


def test_a_whole_local_answer_is_shown_when_the_cloud_fails_after_its_escalation(
    daemon_factory: Any, tmp_path: Path, proxy: FaultProxy
) -> None:
    """Judged at its end (shorter than the checkpoint), the dropped answer is whole: when the cloud then
    fails, that answer is shown instead of being made again."""
    head = _head(min_weight=1000.0, bias=10.0)
    handle = _daemon(daemon_factory, tmp_path, proxy, head, "held", routing={"escalate_tokens": 64})
    client = handle.client()
    forced = client.ask("What is the plural of mouse?", max_tokens=24, temperature=0.0, force="local")
    proxy.set(Fault("status", status=500))
    frames = list(client.chat("What is the plural of mouse?", max_tokens=24, temperature=0.0))
    kinds = [f.type for f in frames]
    assert kinds.index("escalated") < kinds.index("fallback") < kinds.index("delta")
    fallback = next(f for f in frames if isinstance(f, FallbackFrame))
    assert "showing the local answer it was to replace" in fallback.message
    assert "".join(f.text for f in frames if isinstance(f, DeltaFrame)) == forced.text
    row = next(r for r in handle.rows() if r["id"] == fallback.decision)
    assert (row["outcome"], row["backend"], row["tokens_out"]) == ("fallback", "local", forced.done.tokens_out)
    assert row["error_code"] == fallback.cause == "cloud_http"
    assert json.loads(row["confidence"])["kept"] is True  # the user got it: their label is about it
    client.feedback(fallback.decision, True)
    _wait_for_local_confidence_labels(tmp_path / "held", 1)


def test_an_escalation_says_what_the_cloud_receives_and_a_failure_after_it_records_it(
    daemon_factory: Any, tmp_path: Path, proxy: FaultProxy
) -> None:
    """Walk finding: `-v` said "uploaded to the cloud: none" for a turn answered locally first, then the
    escalation uploaded the attachment without a word, and when the cloud failed the record said nothing
    had been sent."""
    # at the default weight the shipped policy escalates with the relevant document (0: MESS+ alone sends none)
    head = _head(min_weight=1000.0, bias=10.0)
    handle = _daemon(daemon_factory, tmp_path, proxy, head, "told", routing={"weight_policy": 0.5})
    notes = Attachment("document", "notes.md", data=b"Irregular plurals: mouse, mice; goose, geese.\n")
    proxy.set(Fault("status", status=500))
    turn = handle.client().chat("What is the plural of mouse?", attachments=[notes], max_tokens=24, temperature=0.0)
    frames = list(turn)
    decision = frames[0]
    assert isinstance(decision, DecisionFrame) and decision.attachments_sent == []  # a local answer first
    escalated = next(f for f in frames if isinstance(f, EscalatedFrame))
    assert escalated.message.endswith(f"; {CLOUD} receives notes.md"), escalated.message
    assert "notes.md" in proxy.chat_requests()[0].body["messages"][-1]["content"]  # it did
    fallback = next(f for f in frames if isinstance(f, FallbackFrame))
    assert f"{CLOUD} had received notes.md" in fallback.message
    (row,) = handle.rows()
    assert row["outcome"] == "fallback" and json.loads(row["attachments_sent"]) == ["notes.md"]


def test_the_http_door_names_an_escalation_and_streams_only_the_clouds_answer(
    daemon_factory: Any, tmp_path: Path, proxy: FaultProxy
) -> None:
    port = free_port()
    head = _head(min_weight=1000.0, bias=10.0)
    _daemon(daemon_factory, tmp_path, proxy, head, "http", http={"listen": f"127.0.0.1:{port}"})
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
    ask: Any = {"model": "auto", "messages": QUESTION, "max_tokens": 24, "temperature": 0.0}
    whole = client.chat.completions.create(**ask)
    locod = (whole.model_extra or {})["locod"]
    assert locod["outcome"] == "escalated" and "not sure enough" in locod["escalated"] and whole.model == CLOUD
    chunks = list(client.chat.completions.create(**ask, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # the cloud's answer
    assert (chunks[-1].model_extra or {})["locod"]["outcome"] == "escalated"


def test_a_daemon_killed_in_an_escalations_cloud_phase_keeps_the_local_answers_confidence(
    daemon_factory: Any, tmp_path: Path, proxy: FaultProxy
) -> None:
    """The local answer was judged (its confidence is what a label of the escalation trains the head on):
    a kill -9 while the cloud answers must not lose it with the turn's completion."""
    from locod.daemon.records import DecisionLog

    handle = _daemon(daemon_factory, tmp_path, proxy, _head(min_weight=1000.0, bias=10.0), "killed")
    proxy.set(Fault("delay", delay_s=120.0))  # the cloud never answers in time
    for frame in handle.client().chat("What is the plural of mouse?", max_tokens=24, temperature=0.0):
        if isinstance(frame, EscalatedFrame):
            break
    handle.proc.kill()
    handle.proc.wait(30)
    log = DecisionLog(handle.db_path)  # what the next start does to the turn
    log.close()
    (row,) = handle.rows()
    assert row["outcome"] == "interrupted" and log.interrupted_at_start == 1
    judged = json.loads(row["confidence"])
    assert judged["model"] == LOCAL and judged["kept"] is False and judged["s_answered"] == frame.confidence
