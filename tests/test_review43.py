"""Review of the turn's error paths, the local backend and the learner (review43): each defect shown against
the real daemon (real model, real loopback cloud behind tests/faultproxy.py, real SQLite) or the real module."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from locod.protocol import Attachment

from .conftest import Context, cloud_config, wait_for
from .faultproxy import Fault, FaultProxy
from .test_attacks14 import dealer, receive, send, status
from .test_cancel31 import LONG_PROMPT, MODEL
from .test_escalation import _daemon, _head


def test_a_cut_cloud_stream_whose_fallback_is_cancelled_in_the_local_queue_keeps_what_it_was_billed(
    daemon_factory: Any, proxy: FaultProxy, ctx: Context
) -> None:
    """The cloud's stream broke after it began (real providers bill the part they streamed, and had the whole
    question), and the turn fell back to the local model, which another client's long prompt held. Its client
    left while it waited: the record said the turn cost nothing and uploaded nothing, so today's spend (the
    daily cap, /metrics) lost the billed part. A fallback whose local answer failed or was cancelled while it
    ran kept it; only the one cancelled in the queue did not."""
    config = cloud_config(proxy.base_url, timeout_s=60.0)
    model = {"name": MODEL, "path": "SmolLM2-135M-Instruct.Q4_1.gguf", "n_ctx": 16384}
    config["local"] = {"n_threads": 1, "models": [model]}
    handle = daemon_factory(config)
    holder = dealer(handle, ctx)  # holds the local model while it reads a 14,000-token prompt
    send(holder, "holder", "chat", prompt=LONG_PROMPT, options={"force": "local", "max_tokens": 8})
    assert receive(holder)["type"] == "decision"

    proxy.set(Fault("cut", cut_after_chunks=3))
    leaver = dealer(handle, ctx)
    send(leaver, "leaver", "chat", prompt="Name three colours.", options={"max_tokens": 64, "temperature": 0.0})
    assert receive(leaver)["type"] == "decision"  # accepted: sent to the cloud, whose stream is then cut
    wait_for(lambda: status(handle, ctx)["queue"]["waiting_for_local"] == 1, 120, "the fallback to queue")
    leaver.close()
    wait_for(lambda: [r for r in handle.rows() if r["outcome"] == "cancelled"], 120, "the fallback's cancel")
    holder.close()

    (row,) = [r for r in handle.rows() if r["request_id"] == "leaver"]
    assert (row["outcome"], row["location"], row["backend"]) == ("cancelled", "cloud", "local")
    assert row["cost_usd"] > 0 and row["cost_estimated"] == 1  # the cut part, priced from its text
    assert row["bytes_up"] > 0  # the question left the device


def test_a_held_local_answer_shown_after_the_clouds_failure_says_why_it_ended(
    daemon_factory: Any, tmp_path: Path, proxy: FaultProxy
) -> None:
    """An escalation dropped a whole local answer, the cloud then failed, and the held answer was shown: its
    ``done`` frame carried no ``finish_reason``, though the same answer shown unjudged says it (a client
    reading it could not tell an answer cut at ``max_tokens`` from one that ended)."""
    unsure = _head(min_weight=1000.0, bias=10.0)
    handle = _daemon(daemon_factory, tmp_path, proxy, unsure, "held", routing={"escalate_tokens": 64})
    client = handle.client()
    forced = client.ask("What is the plural of mouse?", max_tokens=24, temperature=0.0, force="local")
    assert forced.done.finish_reason in ("stop", "length")
    proxy.set(Fault("status", status=500))
    result = client.ask("What is the plural of mouse?", max_tokens=24, temperature=0.0)
    assert result.fallback is not None and "showing the local answer" in result.fallback.message
    assert result.text == forced.text and result.done.finish_reason == forced.done.finish_reason


def test_a_turn_answered_by_another_action_than_it_began_with_is_labelled_on_that_actions_features(
    daemon_factory: Any, tmp_path: Path, proxy: FaultProxy
) -> None:
    """A label trains the model that answered on the features its record keeps, which were those of the action
    the record was begun with. An escalated turn's label trained the cloud model on what the local model saw
    (here a document the cloud was never sent), and a fallback's, once the fix above kept the escalation's,
    the local model on what the cloud would have seen. The record now keeps the features of what answered."""
    unsure = _head(min_weight=1000.0, bias=10.0)
    handle = _daemon(daemon_factory, tmp_path, proxy, unsure, "handed")
    recipe = Attachment("document", "recipe.md", data=b"Whisk two eggs with sugar, fold in flour, bake for an hour.\n")
    client = handle.client()
    escalated = client.ask("What is the plural of mouse?", attachments=[recipe], max_tokens=24, temperature=0.0)
    assert escalated.done.outcome == "escalated" and escalated.decision.attachments_sent == []
    proxy.set(Fault("status", status=500))
    fell_back = client.ask("What is the plural of goose?", attachments=[recipe], max_tokens=24, temperature=0.0)
    assert fell_back.done.outcome == "fallback" and fell_back.done.location == "local"

    rows = {row["id"]: row for row in handle.rows()}
    cloud, local = (json.loads(rows[turn.done.decision]["features"]) for turn in (escalated, fell_back))
    assert cloud["n_attachments"] == 0  # the cloud answered without the recipe
    assert cloud["withheld_relevance"] == local["max_relevance"]
    assert local["n_attachments"] == 1  # the local model answered with it
