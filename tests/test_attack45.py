"""Attacks on a running daemon, round 45: the files it reads while it runs (the policy, attachments)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from locod.policy.observation import N_ACTIONS, OBS_DIM
from locod.policy.onnx_policy import DEFAULT_POLICY

from .faultproxy import FaultProxy
from .test_attacks8 import _peak_rss
from .test_policy import policy_config

EXPANDED_FLOATS = 250_000_000  # 1 GiB of float32


def expanding_policy(path: Path, trigger: str) -> Path:
    """A 2 kB policy with the shipped metadata that answers even log-probabilities over the allowed actions,
    plus 0 x the sum of EXPANDED_FLOATS ones expanded from a single number: always (``trigger`` "constant": a
    part of the graph that depends on no input), or only where an observation feature is 1 ("observed": a
    real turn's one-hot features; the load-time probes' are below 1, so it passes them)."""
    import onnx
    from onnx import TensorProto, helper

    constants = [
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("far", TensorProto.FLOAT, [], [1e4]),
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("floats", TensorProto.FLOAT, [], [float(EXPANDED_FLOATS)]),
        helper.make_tensor("axis0", TensorProto.INT64, [1], [0]),
        helper.make_tensor("constant_shape", TensorProto.INT64, [1], [EXPANDED_FLOATS]),
    ]
    even = [
        helper.make_node("Sub", ["mask", "one"], ["off"]),  # 0 where allowed, -1 where masked
        helper.make_node("Mul", ["off", "far"], ["logits"]),
        helper.make_node("LogSoftmax", ["logits"], ["even"], axis=-1),
    ]
    shape = [
        helper.make_node("ReduceMax", ["observation"], ["top"], keepdims=0),
        helper.make_node("Floor", ["top"], ["whole"]),  # 0 at the probes, 1 at a turn
        helper.make_node("Mul", ["whole", "floats"], ["count"]),
        helper.make_node("Cast", ["count"], ["count_i"], to=TensorProto.INT64),
        helper.make_node("Unsqueeze", ["count_i", "axis0"], ["observed_shape"]),
    ]
    expanded = [
        helper.make_node("Expand", ["one", f"{trigger}_shape"], ["big"]),
        helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
        helper.make_node("Mul", ["total", "zero"], ["nothing"]),
        helper.make_node("Add", ["even", "nothing"], ["log_probs"]),
    ]
    nodes = even + (shape if trigger == "observed" else []) + expanded
    declared = [
        helper.make_tensor_value_info("observation", TensorProto.FLOAT, ["batch", OBS_DIM]),
        helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", N_ACTIONS]),
    ]
    output = helper.make_tensor_value_info("log_probs", TensorProto.FLOAT, ["batch", N_ACTIONS])
    source = onnx.load(str(DEFAULT_POLICY))
    model = helper.make_model(
        helper.make_graph(nodes, "expander", declared, [output], constants), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = source.ir_version
    model.metadata_props.extend(source.metadata_props)
    onnx.save(model, str(path))
    return path


def test_a_small_policy_expanding_to_a_gigabyte_is_refused_or_stopped_within_its_memory(
    daemon_factory: Any, proxy: FaultProxy, tmp_path: Path
) -> None:
    """A 2 kB policy.onnx copied over the running one, whose graph expands one number to 250 million: its
    constant part was computed as it loaded (2 GiB, seconds on the loop) and the reload took it; one that
    expands only on a turn's features passed every check, and each turn's decision then took 1 GiB, which
    onnxruntime's arena kept. Now a policy's runs have an arena of their own, bounded, and nothing is computed
    at load: the first is refused at reload naming the file (the policy before it kept), the second fails
    on the turn, which MESS+ decides, and the daemon's memory never grows by the gigabyte."""
    path = shutil.copy(DEFAULT_POLICY, tmp_path / "policy.onnx")
    handle = daemon_factory(policy_config(proxy.base_url, policy_path=str(path)))
    client = handle.client()
    version = client.status()["routing"]["policy"]
    assert "TMO policy" in client.ask("Hello", max_tokens=2).decision.reason  # the model loaded, the policy routes
    before = _peak_rss(handle.proc.pid)
    expanding_policy(path, "constant")
    refused = client.reload()["policy_error"]
    assert str(path) in refused and "failed on a valid observation" in refused
    assert f"keeping policy {version}" in refused
    assert client.status()["routing"]["policy"] == version
    expanding_policy(path, "observed")
    assert client.reload()["policy_error"] is None  # its probes' features are below 1: it passes them
    result = client.ask("Hello again", max_tokens=2)
    assert result.done.outcome in ("ok", "escalated") and "TMO" not in result.decision.reason
    assert "deciding with MESS+ alone" in handle.log()
    assert _peak_rss(handle.proc.pid) - before < 256 << 20
