"""Attacks on a running daemon, round 45: the files it reads while it runs (the policy, attachments)."""

from __future__ import annotations

import json
import shutil
import struct
import threading
from pathlib import Path
from typing import Any

import pytest

from locod.daemon.documents import chunk_text
from locod.errors import Busy
from locod.policy.observation import N_ACTIONS, OBS_DIM
from locod.policy.onnx_policy import DEFAULT_POLICY
from locod.protocol import Attachment

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


def cluttered_policy(path: Path, unused: int) -> Path:
    """The shipped policy with ``unused`` scalar initializers no node reads (22 bytes each)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(DEFAULT_POLICY))
    model.graph.initializer.extend(helper.make_tensor(f"c{i}", TensorProto.FLOAT, [], [1.0]) for i in range(unused))
    onnx.save(model, str(path))
    return path


def test_a_policy_of_thousands_of_initializers_is_refused_before_onnxruntime_reads_it(
    daemon_factory: Any, proxy: FaultProxy, tmp_path: Path
) -> None:
    """onnxruntime loads a graph on the serving loop at about a millisecond an entry, and more as they grow: a
    1.7 MB policy.onnx of 100,000 initializers no node reads held the loop 111 s at a reload (the service's
    watchdog restarts a loop silent for 30 s, and the start loads it again), logging a warning for each.
    Now a policy of more than 2,000 graph entries is refused from its bytes, naming the file, and the policy
    before it routes on."""
    path = shutil.copy(DEFAULT_POLICY, tmp_path / "policy.onnx")
    handle = daemon_factory(policy_config(proxy.base_url, policy_path=str(path)))
    client = handle.client()
    version = client.status()["routing"]["policy"]
    cluttered_policy(path, 5000)
    refused = client.reload()["policy_error"]
    assert str(path) in refused and "more than 2000 nodes, initializers and value infos" in refused
    assert f"keeping policy {version}" in refused and client.status()["routing"]["policy"] == version
    assert "Removing initializer" not in handle.log()
    cluttered_policy(path, 1000)  # within the bound: loaded, its unused initializers dropped by onnxruntime
    assert client.reload()["policy_error"] is None
    assert "TMO policy" in client.ask("Hello", max_tokens=2).decision.reason


def os2_bitmap(width: int, height: int) -> bytes:
    """A 24-bit BMP with OS/2's 12-byte header (BITMAPCOREHEADER, 16-bit sides), rows of blue to red."""
    row = bytes(b for x in range(width) for b in (255 - 255 * x // width, 0, 255 * x // width))
    pixels = (row + bytes(-len(row) % 4)) * height
    header = struct.pack("<IHHHH", 12, width, height, 1, 24)
    return b"BM" + struct.pack("<IHHI", 26 + len(pixels), 0, 0, 26) + header + pixels


def test_a_bitmap_with_an_os2_header_is_read_at_its_size(daemon_factory: Any) -> None:
    """A BMP whose header is OS/2's (as ImageMagick's BMP2: writes, 16-bit sides) was read as if its sides
    were 32-bit: a 40x30 picture was refused as 1966120x1572865 pixels, outside the accepted size, though
    OpenCV decodes it. Now its sides are read as that header has them."""
    handle = daemon_factory({"routing": {"mode": "local"}})
    picture = Attachment("image", "old.bmp", data=os2_bitmap(40, 30))
    result = handle.client().ask("What is in this picture?", attachments=[picture], max_tokens=2)
    assert result.done.outcome == "ok"
    (offered,) = json.loads(handle.rows()[-1]["attachments_offered"])
    assert (offered["width"], offered["height"]) == (40, 30)


def test_a_document_of_millions_of_paragraphs_stops_splitting_when_its_turn_is_cancelled() -> None:
    """20 MB of one-letter paragraphs are six million of them: splitting them took half a minute of a turn's
    thread, checked for a cancel only after, so `locod stop` waited past its grace (20 s) for a turn its
    client had left. The split is checked at each paragraph now (and is several times faster)."""
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(Busy) as stopped:
        chunk_text("a\n\n" * (6 << 20), 1200, cancelled)
    assert stopped.value.code == "cancelled"
    paragraphs = "\n\n".join(["a"] * 1000)  # packed as before: as many as fit in 1200 characters
    assert chunk_text(paragraphs, 1200) == ["\n\n".join(["a"] * 400)] * 2 + ["\n\n".join(["a"] * 200)]
