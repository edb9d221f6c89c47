"""Shadow answers: the local model answers cloud-answered turns in the background, graded against the
cloud's answer, and the grade labels the local model; the lane never holds the local model against a user."""

from __future__ import annotations

import json
import threading
from typing import Any

from locod.client import Attachment
from locod.daemon.gate import FairGate
from locod.daemon.shadow import AGREEMENT, agreement

from .conftest import cloud_config, wait_for
from .faultproxy import FaultProxy


def test_agreement_is_normalised_word_overlap() -> None:
    assert agreement("Paris.", "paris") == 1.0  # a short reference contained in the answer
    assert agreement("The capital of France is Paris.", "Paris") == 1.0
    assert agreement("It is Lyon.", "Paris") == 0.0
    assert agreement("", "Paris") == 0.0
    same = "the river flows north through the old town to the sea"
    assert agreement(same.upper(), same) == 1.0
    assert agreement("the river flows south", same) < AGREEMENT


def test_background_work_takes_only_an_idle_gate_and_yields_at_once() -> None:
    gate = FairGate()
    preempted = threading.Event()
    with gate.slot("user"), gate.idle_slot(preempted) as granted:
        assert not granted  # a user holds it
    with gate.idle_slot(preempted) as granted:
        assert granted and not preempted.is_set()
        waiter = threading.Thread(target=lambda: gate.slot("user").__enter__())
        waiter.start()
        assert preempted.wait(5)  # a user queued: the background holder is told to stop
    waiter.join(5)
    assert not waiter.is_alive()  # and the user got the gate once it let go


def test_cloud_turns_get_graded_shadow_answers(daemon_factory: Any, proxy: FaultProxy) -> None:
    config = cloud_config(proxy.base_url, timeout_s=60.0)
    config["routing"]["shadow"] = "always"
    handle = daemon_factory(config)
    client = handle.client()
    for question in ("What is the capital of France?", "Name a primary colour."):
        assert client.ask(question, max_tokens=8, temperature=0.0).decision.location == "cloud"
    wait_for(lambda: all(r["shadow"] for r in handle.rows()), 120, "both shadow answers")
    for row in handle.rows():
        shadow = json.loads(row["shadow"])
        assert shadow["model"] == "smollm2-135m-instruct" and shadow["grader"] == "overlap"
        assert isinstance(shadow["satisfied"], bool) and shadow["tokens_out"] > 0
    # a shadow answer's label is learned just after its grade is written to the record: wait for it too
    wait_for(lambda: client.status()["routing"]["shadow_labels"] == 2, 60, "both shadow labels")
    assert client.status()["routing"]["labels"]["smollm2-135m-instruct"] == 2
    listed = handle.cli("decisions").stdout.splitlines()
    assert "shadow" in listed[0].split() and all(("good" in line) or ("bad" in line) for line in listed[1:])


def test_no_shadow_answers_when_switched_off(daemon_factory: Any, proxy: FaultProxy) -> None:
    config = cloud_config(proxy.base_url, timeout_s=60.0)
    config["routing"]["shadow"] = "off"
    handle = daemon_factory(config)
    handle.client().ask("Hello", max_tokens=4)
    assert handle.rows()[0]["shadow"] is None and handle.client().status()["routing"]["shadow_labels"] == 0


def test_a_shadow_answer_cuts_a_dense_document_to_fit_as_a_local_turn_does(
    daemon_factory: Any, proxy: FaultProxy
) -> None:
    """A local turn halves a document's excerpts until they fit its model (Chinese text takes several times
    the four characters a token they are measured at); the shadow lane asked the local model the uncut
    prompt, which never fit, so cloud turns with such documents never gave the local model a label."""
    config = cloud_config(proxy.base_url, timeout_s=60.0)
    config["routing"]["shadow"] = "always"
    config["local"] = {
        "models": [{"name": "smollm2-135m-instruct", "path": "SmolLM2-135M-Instruct.Q4_1.gguf", "n_ctx": 512}]
    }
    config["attachments"] = {"doc_chunk_chars": 200, "doc_token_budget": 100}  # the cloud's excerpt: small
    handle = daemon_factory(config)
    document = Attachment("document", "notes.txt", data=("这是一个关于机器学习的文档。" * 1000).encode())
    result = handle.client().ask("What is this document about?", attachments=[document], max_tokens=4)
    assert result.decision.location == "cloud" and result.done.outcome == "ok"
    (row,) = wait_for(lambda: [r for r in handle.rows() if r["shadow"]], 120, "the shadow answer")
    assert json.loads(row["shadow"])["tokens_out"] > 0
