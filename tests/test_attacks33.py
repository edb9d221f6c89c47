"""Attack 33: what the router reads from files and learns over time, as a hostile or careless hand makes
it. Real daemon, real onnxruntime running graphs built with onnx's helper API, real model, the loopback cloud.

The policy file's load-time probes run the graph on observations whose features are 0 and 0.5; a real turn's
one-hot features are 1. A graph that returned log-probabilities that are none (positive, unnormalised) was
taken, at load and at each turn alike: the turn's record turned them into probabilities with ``math.exp``,
which overflowed past 709, and every turn failed as ``internal``. A graph whose Loop ran 10^12 steps on a real
observation only, never on a probe, held its turn for good, and with the router's lock every turn after it:
a run at turn time had no limit, where the probes had one. A turn decided without its failing policy was
said in one log line a minute, and nowhere else (status did not say the loaded policy was failing), beside
an onnxruntime error line on stderr for every such turn.

A replay trace's turns were read as they came: a missing field or a text where a number goes stopped
`locod policy train` with a KeyError traceback, and NaN or negative rewards and costs trained a policy on
them; `scripts/build_trace.py --rerun-local` met a bad line only after the model had answered every one before it.
The MESS+ state's predictions kept for turns awaiting their label were not checked at load: a NaN there,
once its label came, set Z to a full surplus (the price of satisfaction 0) and the satisfied sum to NaN.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from locod.errors import PolicyError
from locod.policy.onnx_policy import DEFAULT_POLICY, OnnxPolicy

from .conftest import locod_command
from .faultproxy import FaultProxy

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

ANSWERED = {"ok", "escalated"}  # escalated: the local answer was unsure and the cloud answered


def _config(base_url: str, policy: Path) -> dict[str, Any]:
    """Routing in auto with the policy at ``policy`` and one loopback cloud model, so the policy decides."""
    cloud = {"name": "cloud-small", "base_url": base_url, "model": "cloud-small", "usd_per_mtok_in": 0.15}
    return {
        "routing": {"mode": "auto", "explore_c": 0.0, "policy_path": str(policy)},
        "cloud": {"models": [{**cloud, "usd_per_mtok_out": 0.6}]},
    }


def _wrapped(target: Path, nodes: list[Any], constants: list[Any]) -> Path:
    """The shipped policy, its metadata and declared shapes untouched, whose log_probs are what ``nodes``
    make of its own (``raw``) and of ``gate``: 0 for the probes' observations (features 0 and 0.5), 1 for a
    real turn's (a one-hot feature is 1)."""
    model = onnx.load(str(DEFAULT_POLICY))
    for node in model.graph.node:
        node.output[:] = ["raw" if name == "log_probs" else name for name in node.output]
    model.graph.initializer.extend(constants)
    model.graph.node.extend(
        [
            helper.make_node("ReduceMax", ["observation"], ["top"], keepdims=0),
            helper.make_node("Floor", ["top"], ["gate"]),
            *nodes,
        ]
    )
    onnx.save(model, str(target))
    return target


def _lifted(target: Path, always: float, on_turns: float) -> Path:
    """log_probs + ``always`` + ``on_turns`` x gate: positive, unnormalised, on every run or on real turns only."""
    constants = [
        helper.make_tensor("always", TensorProto.FLOAT, [], [always]),
        helper.make_tensor("on_turns", TensorProto.FLOAT, [], [on_turns]),
    ]
    nodes = [
        helper.make_node("Mul", ["gate", "on_turns"], ["turn_lift"]),
        helper.make_node("Add", ["turn_lift", "always"], ["lift"]),
        helper.make_node("Add", ["raw", "lift"], ["log_probs"]),
    ]
    return _wrapped(target, nodes, constants)


def _looping_on_turns(target: Path) -> Path:
    """log_probs after a Loop of 10^12 x gate empty steps: none for a probe, for ever on a real turn."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["go_in"], ["go_out"]), helper.make_node("Identity", ["v_in"], ["v_out"])],
        "step",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("go_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("go_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1]),
        ],
    )
    constants = [
        helper.make_tensor("steps", TensorProto.FLOAT, [], [1e12]),
        helper.make_tensor("go", TensorProto.BOOL, [], [True]),
        helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]),
    ]
    nodes = [
        helper.make_node("Mul", ["gate", "steps"], ["trips_f"]),
        helper.make_node("Cast", ["trips_f"], ["trips"], to=TensorProto.INT64),
        helper.make_node("Loop", ["trips", "go", "zero"], ["looped"], body=body),
        helper.make_node("Mul", ["looped", "zero"], ["nothing"]),
        helper.make_node("Add", ["raw", "nothing"], ["log_probs"]),
    ]
    return _wrapped(target, nodes, constants)


def test_log_probabilities_that_are_none_are_refused_when_the_policy_loads(tmp_path: Path) -> None:
    path = _lifted(tmp_path / "unnormalised.onnx", always=5.0, on_turns=0.0)
    with pytest.raises(PolicyError, match="not log-probabilities") as info:
        OnnxPolicy(path)
    assert info.value.code == "policy_output" and str(path) in info.value.message


def _turns_without_the_policy(handle: Any, count: int) -> dict[str, Any]:
    """Ask ``count`` turns; each is answered, decided without the policy, its record saying so; the status after."""
    client = handle.client(timeout_s=30, turn_timeout_s=60)
    assert client.status()["routing"]["policy_error"] is None  # it passed its checks at load
    for i in range(count):
        result = client.ask(f"Hello {i}", max_tokens=2)
        assert result.done.outcome in ANSWERED and "TMO" not in result.decision.reason
    assert [row["policy_version"] for row in handle.rows()] == [None] * count
    log = handle.log()
    assert log.count("deciding with MESS+ alone") == 1 and "Traceback" not in log and "internal" not in log
    assert "E:onnxruntime" not in log  # its own error line for each stopped or failed run was a flood on stderr
    return client.status()["routing"]


def test_log_probabilities_past_exps_range_on_a_real_turn_leave_it_to_messplus(
    daemon_factory: Any, proxy: FaultProxy, tmp_path: Path
) -> None:
    handle = daemon_factory(_config(proxy.base_url, _lifted(tmp_path / "p.onnx", always=0.0, on_turns=1000.0)))
    routing = _turns_without_the_policy(handle, 3)
    assert routing["policy_failed_turns"] == 3, routing
    assert "not log-probabilities" in handle.log()
    shown = handle.cli("status")
    assert f"policy {routing['policy']} failed on 3 turns since it loaded" in shown.stdout + shown.stderr


def test_a_policy_that_loops_on_real_observations_only_is_stopped_each_turn(
    daemon_factory: Any, proxy: FaultProxy, tmp_path: Path
) -> None:
    handle = daemon_factory(_config(proxy.base_url, _looping_on_turns(tmp_path / "loop.onnx")))
    routing = _turns_without_the_policy(handle, 2)
    assert routing["policy_failed_turns"] == 2, routing
    assert "was still deciding after 1 s and was stopped" in handle.log()


SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
TRACE = SCRIPTS.parent / "policy/data/bigbench_trace.jsonl"


def _hostile_trace(path: Path, damage: Any) -> Path:
    """The development trace's first 20 turns with ``damage`` done to its 12th (line 12)."""
    rows = [json.loads(line) for line in TRACE.read_text().splitlines()[:20]]
    damage(rows[11])
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))  # NaN and Infinity as json writes them
    return path


def _local(row: dict[str, Any]) -> dict[str, Any]:
    return row["models"]["smollm2-135m-instruct"]


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (lambda row: _local(row).update(quality=math.nan), "'smollm2-135m-instruct' quality is NaN"),
        (lambda row: row["models"]["cloud"].update(usd=-1.0), "'cloud' usd is -1.0"),
        (lambda row: row["models"]["cloud"].update(latency_s=math.inf), "'cloud' latency_s is Infinity"),
        (lambda row: _local(row).update(energy_j="5 J"), "'smollm2-135m-instruct' energy_j is \"5 J\""),
        (lambda row: _local(row).pop("quality"), "'smollm2-135m-instruct' quality is null"),
        (lambda row: _local(row).update(satisfied=0.5), "'smollm2-135m-instruct' satisfied is 0.5, not 0 or 1"),
        (lambda row: row.pop("dialogue"), "'dialogue' is null"),
        (lambda row: row.update(dialogue=["d0"]), "'dialogue' is [\"d0\"]"),
        (lambda row: row.update(prompt=7), "'prompt' is 7"),
        (lambda row: row["models"].pop("cloud"), "no 'cloud' answer"),
        (lambda row: row["models"].update(cloud=1.0), "the answer of 'cloud' is no object"),
    ],
)
def test_a_trace_turn_of_other_types_or_values_is_named_by_its_line(tmp_path: Path, damage: Any, said: str) -> None:
    """Training's trace source read every turn as it came: a missing field or a text where a number goes
    stopped it with a KeyError or TypeError (after torch was loaded), and NaN or a negative cost trained
    a policy on garbage rewards."""
    from locod.policy.tmo_env import TraceSource

    path = _hostile_trace(tmp_path / "hostile.jsonl", damage)
    with pytest.raises(PolicyError) as info:
        TraceSource(path)
    assert info.value.code == "trace_invalid" and info.value.message.startswith(f"{path}:12: not a trace turn (")
    assert said in info.value.message


def test_policy_train_names_a_trace_turn_without_its_costs(tmp_path: Path) -> None:
    pytest.importorskip("torch")  # the train extra, which the test extra pulls
    path = _hostile_trace(tmp_path / "hostile.jsonl", lambda row: row["models"]["cloud"].pop("latency_s"))
    out = tmp_path / "policy.onnx"
    done = subprocess.run(
        [*locod_command("policy", "train", "--trace", str(path), "--steps", "64", "--out", str(out))],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert f"{path}:12: not a trace turn ('cloud' latency_s is null" in done.stderr and not out.exists()


def test_the_shipped_traces_are_whole_turns() -> None:
    from locod.policy.trace import read_rows

    for trace in TRACE.parent.glob("*_trace.jsonl"):
        assert read_rows(trace, scored=True)


def test_a_kept_prediction_no_daemon_writes_sets_the_state_aside_at_start(daemon_factory: Any, tmp_path: Path) -> None:
    """The MESS+ state's values were checked at load, all but the predictions it keeps for turns awaiting
    their label: a NaN there was taken, and the turn's label then set Z to -q_cap (a full surplus: the price
    of satisfaction down, routing cheaper than the SLA allows, silently) and the satisfied sum to NaN, which
    the next start found and set the whole state aside for, its labels and learning with it."""
    handle = daemon_factory()
    assert handle.client().ask("Hi", max_tokens=2).done.outcome == "ok"
    handle.stop()
    path = tmp_path / "d" / "state" / "messplus.npz"
    with np.load(path) as data:
        arrays = dict(data)
    assert len(arrays["pending_s"]) == 1  # the turn's prediction, kept until its label comes
    arrays["pending_s"] = np.array([np.nan])
    np.savez(path, **arrays)
    handle = daemon_factory()  # the same home
    decision = handle.rows()[0]["id"]
    assert f"the prediction kept for turn {decision} is nan, not within [0, 1]" in handle.log()
    assert len(list(path.parent.glob("messplus.npz.bad-*"))) == 1
    client = handle.client()
    client.feedback(decision, True)
    assert client.ask("Hi again", max_tokens=2).done.outcome == "ok"
    attained = client.status()["routing"]["attained"]
    assert attained is not None and 0.0 <= attained <= 1.0


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (lambda row: row.pop("prompt"), "not a trace turn ('prompt' is null)"),
        (lambda row: row.pop("gold"), "no 'gold'"),
    ],
)
def test_a_rerun_of_a_damaged_trace_names_its_line(tmp_path: Path, model_path: Path, damage: Any, said: str) -> None:
    """scripts/build_trace.py --rerun-local read the trace's lines as they came and met the damaged one after
    the model had answered every line before it: a KeyError traceback, and nothing written."""
    path = _hostile_trace(tmp_path / "hostile.jsonl", damage)
    out = tmp_path / "rerun.jsonl"
    command = [sys.executable, str(SCRIPTS / "build_trace.py"), "--rerun-local", str(path), "--model", str(model_path)]
    done = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert f"{path}:12: {said}" in done.stderr and not out.exists()
