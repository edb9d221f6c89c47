"""Review 17: the routing code read as its maintainer. The replay and the shipped prior must read a trace
the way the daemon reads the same turn, and the TMO policy must train on what the daemon observes."""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from locod.policy.observation import FEATURE_NAMES, observe
from locod.policy.tasks import TASKS, task_of
from locod.policy.tmo_env import TraceSource

from .conftest import REPO, write_config

SCRIPTS = REPO / "scripts"
TRACE = REPO / "policy/data/bigbench_trace.jsonl"
LOCAL = "smollm2-135m-instruct"  # the development trace's local model


def trace_rows(count: int) -> list[dict[str, Any]]:
    return [json.loads(line) for line in TRACE.read_text().splitlines()[:count]]


@pytest.fixture
def scripts() -> Iterator[dict[str, ModuleType]]:
    """scripts/fit_prior.py and scripts/replay.py as modules (replay imports fit_prior by its bare name)."""
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(SCRIPTS))
    try:
        import fit_prior
        import replay

        yield {"fit_prior": fit_prior, "replay": replay}
    finally:
        sys.path.remove(str(SCRIPTS))


def test_a_trace_answer_is_read_as_the_daemons_checkpoint_reads_it(
    tmp_path: Path, scripts: dict[str, ModuleType]
) -> None:
    """The daemon judges an answer over its first routing.escalate_tokens (32) tokens, its length scaled to
    32; the prior's fit and the replay scaled a trace answer's length to the trace's own answer limit (24
    for most tasks), so the daemon rated the same answer up to 0.13 likelier good than the shipped prior was
    fitted to and the replay measured. Both now read a trace's answers as the checkpoint does: an answer
    that ended by itself, and one cut at the trace's limit (judged on the tokens it has)."""
    from locod.daemon.cloud import CloudBackend
    from locod.daemon.config import load_config
    from locod.daemon.decision import Escalation
    from locod.daemon.escalation import ConfidenceCheck
    from locod.daemon.learner import Learner
    from locod.daemon.records import DecisionLog
    from locod.policy.messplus import RecordedFeatures, TurnFeatures

    config = {"paths": {"state_dir": str(tmp_path / "state"), "models_dir": str(tmp_path / "models")}}
    loaded = load_config(write_config(tmp_path / "config.toml", config), env={})
    records = DecisionLog(tmp_path / "state" / "locod.db")
    learner = Learner(loaded, records, CloudBackend(loaded.cloud, loaded.source))
    rows = trace_rows(200)
    short = next(r for r in rows if 0 < len(r["models"][LOCAL]["tokens"]) < r["models"][LOCAL]["max_tokens"] - 4)
    cut = next(r for r in rows if len(r["models"][LOCAL]["tokens"]) == r["models"][LOCAL]["max_tokens"] < 32)
    for row in (short, cut):
        answer = row["models"][LOCAL]
        features = RecordedFeatures.of(TurnFeatures(prompt="", task=task_of(row["prompt"])))
        budget = loaded.routing.escalate_tokens
        plan = Escalation(LOCAL, "cloud", "cloud", (), 0.5, 0.9, 0.3, budget, features)
        check = ConfidenceCheck(plan, LOCAL, row["prompt"], learner)
        check.keep(answer["tokens"], answer["logprobs"])
        assert check.judged is not None
        daemon = check.judged.features
        fit_prior = scripts["fit_prior"]
        row["models"][fit_prior.LOCAL] = row["models"].pop(LOCAL)  # as fit_prior.read_trace names it
        assert fit_prior.answer_features(row) == daemon
        assert scripts["replay"].turns([row])[0].conf == daemon
    learner.close()
    records.close()


def test_the_policy_trains_on_the_task_the_daemon_observes_for_a_trace_prompt(tmp_path: Path) -> None:
    """The trace's dialogues were observed with the category the trace states for their task ("query" for
    wikidata), while the daemon observes task_of(prompt) ("chat" for those prompts; the two agreed on 300 of
    the development trace's 2,000 turns): the policy learnt the trace's turns under task one-hots the daemon
    never shows it for the same prompts."""
    rows = [r for r in trace_rows(40) if r["dialogue"] == "d0000"]
    assert rows and any(task_of(r["prompt"]) != r["category"] for r in rows)
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    episode = TraceSource(trace).episode(random.Random(1))
    assert [t.inputs.task for t in episode] == [task_of(r["prompt"]) for r in rows]
    seen = observe(episode[0].inputs)
    shown = [t for t in TASKS if seen[FEATURE_NAMES.index(f"task_{t}")] == 1.0]
    assert shown == [task_of(rows[0]["prompt"])]


def test_a_policy_whose_features_are_another_order_under_this_layout_version_is_refused(tmp_path: Path) -> None:
    """The daemon checked a policy file's layout version, K, Z and sizes, not the feature names it records:
    a file trained where TASKS had another order (the same sizes, and no version bump) loaded, and the
    policy read each task's column as another's. Its recorded names must be this layout's, in order."""
    import onnx

    from locod.errors import PolicyError
    from locod.policy.onnx_policy import DEFAULT_POLICY, OnnxPolicy

    assert OnnxPolicy(DEFAULT_POLICY).metadata["locod.feature_names"] == json.dumps(FEATURE_NAMES)
    model = onnx.load(str(DEFAULT_POLICY))
    swapped = [*FEATURE_NAMES]
    first, second = swapped.index("task_chat"), swapped.index("task_code")
    swapped[first], swapped[second] = swapped[second], swapped[first]
    for entry in model.metadata_props:
        if entry.key == "locod.feature_names":
            entry.value = json.dumps(swapped)
    onnx.save(model, str(tmp_path / "reordered.onnx"))
    with pytest.raises(PolicyError, match=r"locod\.feature_names are not this daemon's observation") as info:
        OnnxPolicy(tmp_path / "reordered.onnx")
    assert info.value.code == "policy_mismatch"
