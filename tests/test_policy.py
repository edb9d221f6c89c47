"""The TMO policy: environment invariants, a short RC-PPO run that beats random, ONNX parity, the
run-time checks on policy files, and the daemon deciding attachment subsets with it end to end."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import random
import shutil
import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from locod.errors import PolicyError
from locod.policy.evaluate import ClairvoyantPlan, heuristics, mean_reward, run
from locod.policy.observation import (
    ACTION_NAMES,
    FEATURE_NAMES,
    N_ACTIONS,
    OBS_DIM,
    SUBSETS,
    K,
    ObsInputs,
    Slot,
    action_mask,
    observe,
)
from locod.policy.onnx_policy import DEFAULT_POLICY, OnnxPolicy
from locod.policy.tmo_env import (
    OVERRUN_PENALTY,
    WINDOW,
    Budgets,
    OffloadEnv,
    Simulator,
    TraceSource,
    waited,
    window_after,
)
from locod.protocol import Attachment

from .conftest import wait_for
from .faultproxy import FaultProxy, image_parts

TRACE = Path(__file__).resolve().parent.parent / "policy/data/bigbench_trace.jsonl"
POLICY_V1 = Path(__file__).resolve().parent / "fixtures/policy_v1.onnx"  # the policy shipped with layout 1

torch = pytest.importorskip("torch")
from locod.policy.train import Policy, TrainConfig, export, parity, train  # noqa: E402


def test_action_layout_is_tmos_one_plus_two_to_the_k() -> None:
    assert N_ACTIONS == 1 + 2**K
    assert SUBSETS[0] == () and SUBSETS[-1] == tuple(range(K))
    assert [len(s) for s in SUBSETS] == sorted(len(s) for s in SUBSETS)  # by size, then lexicographic
    assert ACTION_NAMES[:3] == ("local", "cloud", "cloud+0")


def test_mask_excludes_empty_private_and_unseeable_slots() -> None:
    slots = [Slot(0.5, image=True), Slot(0.3, image=False, private=True)]
    mask = action_mask(slots, cloud_allowed=True)
    allowed = {ACTION_NAMES[a] for a in range(N_ACTIONS) if mask[a]}
    assert allowed == {"local", "cloud", "cloud+0"}  # slot 1 is private, slot 2 is empty
    text_only = action_mask(slots, cloud_allowed=True, vision=False)
    assert {ACTION_NAMES[a] for a in range(N_ACTIONS) if text_only[a]} == {"local", "cloud"}
    assert action_mask(slots, cloud_allowed=False).tolist() == [1.0] + [0.0] * (N_ACTIONS - 1)
    assert action_mask([], cloud_allowed=False, local_allowed=False)[0] == 1.0  # something always answers


def test_observation_is_bounded_and_sized() -> None:
    obs = observe(
        ObsInputs(
            task="math",
            prompt_chars=10**9,
            slots=[Slot(7.0, True)] * 5,
            battery=-3,
            power_w=float("nan"),
            upload_bps=1e12,
            rtt_ms=1e9,
            q_norm=float("inf"),
        )
    )
    assert obs.shape == (OBS_DIM,) and obs.dtype == np.float32
    assert np.all((obs >= 0) & (obs <= 1))
    value = dict(zip(FEATURE_NAMES, obs.tolist(), strict=True))
    assert value["power"] == 0.0 and value["q"] == 1.0 and value["rtt"] == 1.0  # NaN, +inf, far too large
    assert value["battery"] == 0.0  # below empty reads as empty (unknown or NaN would read as full)


def test_the_local_wait_is_a_bounded_feature() -> None:
    def wait_feature(seconds: float) -> float:
        return float(
            observe(ObsInputs(task="chat", prompt_chars=40, local_wait_s=seconds))[FEATURE_NAMES.index("local_wait")]
        )

    values = [wait_feature(s) for s in (0.0, 1.0, 10.0, 59.0, 60.0, 3600.0)]
    assert values[0] == 0.0 and values == sorted(values) and len(set(values[:4])) == 4
    assert values[4] == pytest.approx(1.0) and values[5] == 1.0  # a minute or more reads as full
    assert wait_feature(float("nan")) == 0.0 and wait_feature(-5.0) == 0.0


def test_a_long_local_queue_lowers_the_shipped_policys_local_probability() -> None:
    """The shipped policy was trained with a local queue (tmo_env.LocalQueue): on the same turns, a long
    wait moves probability from the local answer to the cloud."""
    policy = OnnxPolicy(DEFAULT_POLICY)
    env = OffloadEnv([(Simulator(), 0.7), (TraceSource(TRACE), 0.3)], seed=31)
    wait = FEATURE_NAMES.index("local_wait")
    thirty_seconds = observe(ObsInputs(task="chat", prompt_chars=1, local_wait_s=30.0))[wait]
    idle, queued = [], []
    for _ in range(100):  # whole episodes, each turn played as the policy would
        (obs, info), ended = env.reset(), False
        while not ended:
            mask = info["action_mask"]
            if mask[0] and mask[1:].any():  # a choice between local and cloud on this turn
                assert obs[wait] == 0.0  # no load drawn: the environment's default
                long_wait = obs.copy()
                long_wait[wait] = thirty_seconds
                idle.append(np.exp(policy.log_probs(obs, mask)[0]))
                queued.append(np.exp(policy.log_probs(long_wait, mask)[0]))
            obs, _, done, truncated, info = env.step(int(np.argmax(policy.log_probs(obs, mask))))
            ended = done or truncated
    assert len(idle) >= 100
    falls = [q < i for i, q in zip(idle, queued, strict=True)]
    assert sum(falls) >= 0.9 * len(falls), (idle, queued)
    assert np.mean(queued) < 0.5 * np.mean(idle), (np.mean(idle), np.mean(queued))


def test_the_environment_charges_the_local_queues_wait() -> None:
    """Under load a local answer waits turns ahead x turn time, which the observation shows and the reward's
    latency term charges; each local answer is one more turn ahead of the next; the budgets do not count it."""
    env = OffloadEnv([(Simulator(links=("wifi",)), 1.0)], seed=6, load_p=1.0)
    for _ in range(50):
        obs, _ = env.reset()
        if env.queue.ahead >= 3 and len(env.turns) >= 2:
            break
    else:
        pytest.fail("no episode with a queue in 50 draws")
    wait = env.wait_s()
    assert wait == pytest.approx(env.queue.ahead * env.queue.turn_s) and wait > 0
    assert obs[FEATURE_NAMES.index("local_wait")] > 0
    turn, ahead = env.turns[0], env.ahead
    _, _, _, _, step = env.step(0)
    assert step["wait"] == wait and step["latency"] == pytest.approx(turn.latency[0] + wait)
    assert env.recent[-1][0] == pytest.approx(turn.latency[0])  # the budget counts the device's own time
    assert env.ahead == pytest.approx(max(0.0, ahead + 1 - env.queue.drained[0]) + env.queue.arrivals[0])
    assert env.queue.after(ahead, 0, local=True) - env.queue.after(ahead, 0, local=False) > 0


def test_trace_turns_are_observed_on_the_simulators_networks() -> None:
    """A network seen only on simulated turns told the shipped policy a turn was simulated (the cloud always
    wins there): on ethernet it gave the local answer 0.1 % where WiFi gave 50 % (docs/evaluation.md)."""
    rng = random.Random(2)
    trace = TraceSource(TRACE)
    links = {turn.inputs.link for _ in range(200) for turn in trace.episode(rng)}
    assert links == set(Simulator.links)


def test_budget_accounting_and_overrun_reward() -> None:
    env = OffloadEnv([(Simulator(), 1.0)], seed=3)
    _, info = env.reset(seed=3, options={"budgets": Budgets(latency_s=1e9, usd=1e-12, energy_j=1e9)})
    # nothing fits so small a money budget: the shield leaves the action overrunning least, the local one
    assert info["action_mask"].tolist() == [1.0] + [0.0] * (N_ACTIONS - 1)
    _, reward, _, _, step = env.step(0)
    assert step["violation"] and reward == -OVERRUN_PENALTY and env.violations == 1
    assert env.recent[-1][1] == pytest.approx(step["usd"])
    assert env.remaining()[1] == 0.0
    env.reset(seed=3, options={"budgets": Budgets(1e9, 1e9, 1e9)})
    _, reward, _, _, step = env.step(0)
    assert not step["violation"] and reward != 0.0
    with pytest.raises(ValueError, match="masked"):
        env.reset(seed=4)
        env.step(int(np.flatnonzero(env.turns[0].mask == 0)[0]) if (env.turns[0].mask == 0).any() else N_ACTIONS)


def test_shield_masks_actions_expected_to_overrun() -> None:
    env = OffloadEnv([(Simulator(links=("wifi",)), 1.0)], seed=5)
    for episode in range(50):
        env.reset(seed=episode)
        turn = env.turns[0]
        if turn.mask[1] and turn.mask[2]:
            break
    else:
        pytest.fail("no episode offered an upload")
    text_usd, upload_usd = turn.expected_spend()[1, 1], turn.expected_spend()[1, 2]
    _, info = env.reset(seed=episode, options={"budgets": Budgets(1e9, (text_usd + upload_usd) / 2, 1e9)})
    assert info["action_mask"][0] == 1 and info["action_mask"][1] == 1  # local, and text to the cloud
    assert not any(info["action_mask"][2:])  # every upload costs more than is left


def test_budgets_cover_a_sliding_window_of_turns() -> None:
    """What a turn leaves is forgotten WINDOW turns later: the budget is a rate, like a day's money cap."""
    env = OffloadEnv([(Simulator(links=("wifi",)), 1.0)], seed=8, budget_span=(1.0, 1.0))
    while len(env.turns) < WINDOW + 1:
        env.reset()
    spends = []
    for _ in range(WINDOW + 1):
        _, _, _, _, step = env.step(0)
        spends.append(np.array([step["latency"], step["usd"], step["energy"]]))
        window = sum(spends[-(WINDOW - 1) :])
        assert env.remaining() == pytest.approx(tuple(1 - window / env.budgets.array()))


@pytest.mark.parametrize("span", [(0.0, 0.0), (0.0, 0.1), None])
def test_the_shield_keeps_every_strategy_within_budget(span: tuple[float, float] | None) -> None:
    """Whatever is picked from the mask, down to budgets at their floor, no window overruns, and the local
    answer is always on offer (the reserve the shield keeps)."""
    env = OffloadEnv([(Simulator(), 0.7), (TraceSource(TRACE), 0.3)], seed=12, budget_span=span)
    rng = random.Random(0)
    for _ in range(300):
        _, info = env.reset()
        done = False
        while not done:
            assert info["action_mask"][0] == 1.0
            spendthrift = int(np.flatnonzero(info["action_mask"])[-1])  # the dearest choice on offer
            action = spendthrift if rng.random() < 0.7 else rng.choice(np.flatnonzero(info["action_mask"]).tolist())
            _, _, done, _, info = env.step(action)
            assert not info["violation"]


def test_the_clairvoyant_plan_beats_every_shielded_walk() -> None:
    """The evaluation's upper yardstick: its plan has at least the mean reward of any sequence of shielded
    actions (here, random walks through the same episodes), the local queue's wait included."""
    env = OffloadEnv([(Simulator(), 1.0)], seed=21, load_p=0.5)
    plan, rng = ClairvoyantPlan(), random.Random(1)
    plan.bind(env)
    for _ in range(20):
        env.reset()
        best, _ = plan.best_from(0, [], env.ahead)
        for _ in range(30):
            recent, total, ahead = [], 0.0, env.ahead
            for index, turn in enumerate(env.turns):
                action = rng.choice(np.flatnonzero(env.shielded(turn, recent)).tolist())
                total += float(mean_reward(env, turn, waited(turn.latency, env.queue.wait_s(ahead)))[action])
                recent = window_after(recent, turn.spend(action))
                ahead = env.queue.after(ahead, index, action == 0)
            assert total <= best + 1e-12


@pytest.fixture(scope="module")
def short_policy() -> Any:
    return train([(Simulator(), 1.0)], TrainConfig(steps=12_288, seed=7))


def test_short_training_beats_random(short_policy: Any) -> None:
    def greedy(obs: np.ndarray, mask: np.ndarray, rng: random.Random) -> int:
        with torch.no_grad():
            return int(short_policy(torch.as_tensor(obs)[None], torch.as_tensor(mask)[None]).argmax())

    sources = [(Simulator(), 1.0)]
    trained = run(greedy, sources, episodes=300, seed=99)
    uniform = run(heuristics()["random"], sources, episodes=300, seed=99)
    assert trained.reward > uniform.reward + 0.02


def test_onnx_export_matches_torch(short_policy: Any, tmp_path: Path) -> None:
    path = tmp_path / "p.onnx"
    export(short_policy, path, version="test", data_sha256="0" * 64, config=TrainConfig())
    assert parity(short_policy, path, n=1000) < 1e-5
    loaded = OnnxPolicy(path)
    assert loaded.version == "test" and json.loads(loaded.metadata["locod.action_names"])[0] == "local"
    mask = np.ones(N_ACTIONS, dtype=np.float32)
    mask[3:] = 0
    log_pi = loaded.log_probs(np.zeros(OBS_DIM, dtype=np.float32), mask)
    assert np.exp(log_pi[:3]).sum() == pytest.approx(1.0, abs=1e-5) and np.all(log_pi[3:] < -1e6)


def test_log_probs_match_a_fresh_session_run_call_after_call() -> None:
    """log_probs reuses bound buffers across calls: each call must see its own inputs only."""
    policy = OnnxPolicy(DEFAULT_POLICY)
    rng = np.random.default_rng(3)
    for _ in range(20):
        obs = rng.random(OBS_DIM, dtype=np.float32)
        mask = (rng.random(N_ACTIONS) < 0.6).astype(np.float32)
        mask[0] = 1.0
        fresh = policy.session.run(None, {"observation": obs[None], "mask": mask[None]})[0][0]
        assert np.array_equal(policy.log_probs(obs, mask), fresh.astype(np.float64))


def nan_policy(folder: Path) -> Path:
    """The shipped policy with its first weight matrix NaN: a well-formed file that answers garbage."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(DEFAULT_POLICY))
    first = model.graph.initializer[0]
    first.CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(first), np.nan), first.name))
    onnx.save(model, str(folder / "nan.onnx"))
    return folder / "nan.onnx"


def test_a_policy_that_returns_nan_is_refused_when_it_loads(tmp_path: Path) -> None:
    path = nan_policy(tmp_path)  # well-formed, declared shapes right: only running it shows the garbage
    with pytest.raises(PolicyError, match="non-finite log-probabilities on a valid observation") as info:
        OnnxPolicy(path)
    assert info.value.code == "policy_output" and str(path) in info.value.message


def shape_shifting_policy(path: Path, reps_from: str) -> Path:
    """A policy with the shipped metadata whose inputs and output declare the right shapes, but whose graph
    computes ``Tile(log-probabilities even over the allowed actions, [1, reps])``: reps = 100000 x max(mask)
    (``mask``: wrong for every observation), or 1 + floor(max(observation)) (``observation``: right for the
    load-time probes, whose features are below 1, wrong for a real turn's, whose one-hot features are 1)."""
    import onnx
    from onnx import TensorProto, helper

    source = onnx.load(str(DEFAULT_POLICY))
    declared = [
        helper.make_tensor_value_info("observation", TensorProto.FLOAT, ["batch", OBS_DIM]),
        helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", N_ACTIONS]),
    ]
    output = helper.make_tensor_value_info("log_probs", TensorProto.FLOAT, ["batch", N_ACTIONS])
    constants = [
        helper.make_tensor("one", TensorProto.INT64, [1], [1]),
        helper.make_tensor("axis0", TensorProto.INT64, [1], [0]),
        helper.make_tensor("factor", TensorProto.FLOAT, [], [100000.0 if reps_from == "mask" else 1.0]),
        helper.make_tensor("offset", TensorProto.FLOAT, [], [0.0 if reps_from == "mask" else 1.0]),
        helper.make_tensor("one_f", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("far", TensorProto.FLOAT, [], [1e4]),
    ]
    nodes = [
        helper.make_node("Sub", ["mask", "one_f"], ["off"]),  # 0 where allowed, -1 where masked
        helper.make_node("Mul", ["off", "far"], ["logits"]),
        helper.make_node("LogSoftmax", ["logits"], ["even"], axis=-1),
        helper.make_node("ReduceMax", [reps_from], ["top"], keepdims=0),
        helper.make_node("Floor", ["top"], ["whole"]),
        helper.make_node("Mul", ["whole", "factor"], ["scaled"]),
        helper.make_node("Add", ["scaled", "offset"], ["count"]),
        helper.make_node("Cast", ["count"], ["count_i"], to=TensorProto.INT64),
        helper.make_node("Unsqueeze", ["count_i", "axis0"], ["count_1"]),
        helper.make_node("Concat", ["one", "count_1"], ["reps"], axis=0),
        helper.make_node("Tile", ["even", "reps"], ["log_probs"]),
    ]
    graph = helper.make_graph(nodes, "shape-shifter", declared, [output], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = source.ir_version
    model.metadata_props.extend(source.metadata_props)
    onnx.save(model, str(path))
    return path


def test_a_policy_computing_another_shape_than_it_declares_is_refused_when_it_loads(tmp_path: Path) -> None:
    path = shape_shifting_policy(tmp_path / "tile.onnx", "mask")
    with pytest.raises(PolicyError, match=r"computes log_probs of shape \[1, 900000\]") as info:
        OnnxPolicy(path)
    assert str(path) in info.value.message


def test_a_policy_failing_at_run_time_is_a_policy_error_not_a_crash(tmp_path: Path) -> None:
    policy = OnnxPolicy(shape_shifting_policy(tmp_path / "late.onnx", "observation"))  # passes the probes
    with pytest.raises(PolicyError, match="failed") as info:
        policy.log_probs(np.ones(OBS_DIM, dtype=np.float32), np.ones(N_ACTIONS, dtype=np.float32))
    assert info.value.code == "policy_output"


def test_a_policy_file_that_is_a_fifo_is_refused_without_waiting(tmp_path: Path) -> None:
    fifo = tmp_path / "policy.onnx"
    os.mkfifo(fifo)  # nobody ever writes to it: opening it blocking would wait forever
    with pytest.raises(PolicyError, match="not a regular file") as info:
        OnnxPolicy(fifo)
    assert str(fifo) in info.value.message


def test_shipped_default_policy_loads_and_is_small() -> None:
    policy = OnnxPolicy(DEFAULT_POLICY)
    assert DEFAULT_POLICY.stat().st_size < 1_000_000
    assert policy.metadata["locod.training_data_sha256"]


def test_bad_policy_files_are_named_errors(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as info:
        OnnxPolicy(tmp_path / "missing.onnx")
    assert info.value.code == "policy_missing"
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x01garbage" * 10)
    with pytest.raises(PolicyError) as info:
        OnnxPolicy(corrupt)
    assert info.value.code == "policy_corrupt"
    import onnx

    model = onnx.load(str(DEFAULT_POLICY))
    for entry in model.metadata_props:
        if entry.key == "locod.layout_version":
            entry.value = "0"
    onnx.save(model, str(tmp_path / "old.onnx"))
    with pytest.raises(PolicyError, match=r"locod\.layout_version is '0'") as info:
        OnnxPolicy(tmp_path / "old.onnx")
    assert info.value.code == "policy_mismatch"


def test_a_policy_of_layout_v1_runs_on_the_features_it_was_trained_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A user's policy trained before the local wait was observed still loads: one warning, and it sees this
    layout's observation less the local wait, exactly as it saw v1's."""
    with caplog.at_level("WARNING", logger="locod.policy.onnx_policy"):
        policy = OnnxPolicy(POLICY_V1)
    assert policy.metadata["locod.layout_version"] == "1"
    (record,) = caplog.records
    assert "observation layout 1 (this daemon's is 2): it runs without local_wait" in record.getMessage()
    rng = np.random.default_rng(4)
    wait = FEATURE_NAMES.index("local_wait")
    for _ in range(20):
        obs = rng.random(OBS_DIM, dtype=np.float32)
        mask = np.ones(N_ACTIONS, dtype=np.float32)
        fresh = policy.session.run(None, {"observation": np.delete(obs, wait)[None], "mask": mask[None]})[0][0]
        np.testing.assert_allclose(policy.log_probs(obs, mask), fresh, rtol=1e-6)
    import onnx

    model = onnx.load(str(POLICY_V1))  # layout 1, but features that are not v1's: refused as before
    for entry in model.metadata_props:
        if entry.key == "locod.feature_names":
            entry.value = json.dumps(list(reversed(json.loads(entry.value))))
    onnx.save(model, str(tmp_path / "v1-other.onnx"))
    with pytest.raises(PolicyError, match=r"locod\.layout_version is '1', this daemon needs '2'") as info:
        OnnxPolicy(tmp_path / "v1-other.onnx")
    assert info.value.code == "policy_mismatch"


# -- end to end through the daemon -----------------------------------------------------------------


def image(width: int, height: int) -> Attachment:
    pixels = np.full((height, width, 3), 128, np.uint8)
    return Attachment("image", f"view-{width}x{height}.png", data=cv2.imencode(".png", pixels)[1].tobytes())


def policy_config(base_url: str, **routing: Any) -> dict[str, Any]:
    return {
        "routing": {"mode": "auto", "explore_c": 0.0, **routing},
        "cloud": {
            "models": [
                {
                    "name": "cloud-small",
                    "base_url": base_url,
                    "model": "cloud-small",
                    "usd_per_mtok_in": 0.15,
                    "usd_per_mtok_out": 0.6,
                }
            ]
        },
    }


def test_daemon_uploads_exactly_the_chosen_subset(daemon_factory: Any, proxy: FaultProxy) -> None:
    handle = daemon_factory(policy_config(proxy.base_url, explore_c=50.0))  # explore: many different subsets
    client = handle.client()
    assert client.status()["routing"]["policy"] == OnnxPolicy(DEFAULT_POLICY).version
    views = [image(320, 240), image(240, 320), image(200, 200)]
    for i in range(8):
        client.ask(f"What do you see in these camera images? ({i})", attachments=views, max_tokens=2)
    seen = iter(proxy.chat_requests())
    cloud_rows = 0
    for row in handle.rows():
        sent = json.loads(row["attachments_sent"])
        assert json.loads(row["probabilities"]) and row["policy_version"]
        if row["backend"] != "cloud":  # where it was answered: an escalated turn was routed local first
            assert sent == []
            continue
        cloud_rows += 1
        uploaded = image_parts(next(seen))
        sizes = []
        for url in uploaded:
            pixels = cv2.imdecode(np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
            sizes.append(f"view-{pixels.shape[1]}x{pixels.shape[0]}.png")
        assert sorted(sizes) == sorted(sent)
    assert cloud_rows > 0


def test_private_attachments_are_never_uploaded(daemon_factory: Any, proxy: FaultProxy) -> None:
    handle = daemon_factory(policy_config(proxy.base_url, explore_c=50.0))
    secret = dataclasses.replace(image(300, 300), name="passport.png", private=True)
    for i in range(6):
        handle.client().ask(f"Look at this image {i}", attachments=[secret, image(100, 80)], max_tokens=2)
    for request in proxy.chat_requests():
        for url in image_parts(request):
            pixels = cv2.imdecode(np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
            assert pixels.shape[:2] == (80, 100)
    for row in handle.rows():
        assert "passport.png" not in json.loads(row["attachments_sent"])
        mask = json.loads(row["mask"])
        assert mask and not mask.get("cloud-small|cloud+0,1")


def test_daily_cap_masks_uploads_that_could_pass_it(daemon_factory: Any, proxy: FaultProxy) -> None:
    """The cap as a shield: an image costs $0.01, the day's cap is $0.009, so no action that uploads one is
    offered, while text to the cloud (far cheaper) still is."""
    config = policy_config(proxy.base_url, explore_c=50.0)  # explore: any offered action may be taken
    # 2 tokens of answer: $0.0012 (the server may count a third: $0.0018), so 4 text turns fit the cap
    config["cloud"]["models"][0].update(usd_per_image=0.01, usd_per_mtok_out=600.0)
    config["cloud"]["daily_cap_usd"] = 0.009
    handle = daemon_factory(config)
    for i in range(4):
        handle.client().ask(f"What is in this picture? ({i})", attachments=[image(120, 90)], max_tokens=2)
    for row in handle.rows():
        mask = json.loads(row["mask"])
        assert mask["cloud-small|cloud"] and not mask["cloud-small|cloud+0"]
        assert json.loads(row["attachments_sent"]) == []
    assert all(image_parts(request) == [] for request in proxy.chat_requests())
    assert sum(row["cost_usd"] or 0.0 for row in handle.rows()) < 0.009
    broke = handle.client().ask("One more?", max_tokens=20)  # 20 tokens of answer could cost $0.012
    assert broke.decision.location == "local" and "left of today's $0.009 cap" in broke.decision.reason
    assert "a cloud answer of up to 20 tokens may cost $0.012" in broke.decision.reason


def test_corrupt_policy_falls_back_to_messplus_and_reload_swaps_it(
    daemon_factory: Any, proxy: FaultProxy, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx at all")
    handle = daemon_factory(policy_config(proxy.base_url, policy_path=str(bad)))
    client = handle.client()
    routing = client.status()["routing"]
    assert routing["policy"] is None and "is not a loadable ONNX model" in routing["policy_error"]
    assert "routing with MESS+ alone" in handle.log()
    result = client.ask("Hello", max_tokens=2)
    assert result.done.outcome in ("ok", "escalated") and "TMO" not in result.decision.reason
    shutil.copy(DEFAULT_POLICY, bad)  # a good policy at the same path, then reload without a restart
    assert client.reload()["reloaded"] is True
    wait_for(lambda: client.status()["routing"]["policy"] is not None, 10, "the policy to load")
    assert "TMO policy" in client.ask("Hello again", max_tokens=2).decision.reason
    assert handle.rows()[-1]["policy_version"] == OnnxPolicy(DEFAULT_POLICY).version


def test_the_daemon_shows_the_policy_its_local_queue(daemon_factory: Any, proxy: FaultProxy) -> None:
    """With turns queued for the local model, the policy observes the wait and gives the local answer less
    probability than on the idle daemon."""
    handle = daemon_factory(policy_config(proxy.base_url))
    client = handle.client()
    question = "What is the capital of France?"

    def p_local(session: str) -> float:  # a session of its own: the same observation but for the queue (and Q)
        client.ask(question, session=session, max_tokens=2)
        return float(json.loads(handle.rows()[-1]["probabilities"])["local"])

    idle = p_local("idle")
    flooders = [
        threading.Thread(
            target=lambda i=i: handle.client(turn_timeout_s=300).ask(
                f"Write a long story about a dragon named {i}.", force="local", max_tokens=256
            ),
            daemon=True,
        )
        for i in range(6)
    ]
    for thread in flooders:
        thread.start()
    wait_for(lambda: client.status()["queue"]["waiting_for_local"] >= 4, 60, "turns queued for the local model")
    queued = p_local("queued")
    for thread in flooders:
        thread.join(300)
    assert queued < 0.75 * idle, (idle, queued)  # at least 4 turns ahead: 0.5-0.6 x with the shipped policy


def test_the_daemon_runs_a_layout_v1_policy(daemon_factory: Any, proxy: FaultProxy) -> None:
    handle = daemon_factory(policy_config(proxy.base_url, policy_path=str(POLICY_V1)))
    client = handle.client()
    routing = client.status()["routing"]
    assert routing["policy"] == OnnxPolicy(POLICY_V1).version and routing["policy_error"] is None
    assert "observation layout 1 (this daemon's is 2): it runs without local_wait" in handle.log()
    assert "TMO policy" in client.ask("Hello", max_tokens=2).decision.reason


def test_reloads_during_turns_drop_none(daemon_factory: Any, proxy: FaultProxy, tmp_path: Path) -> None:
    """Config, policy and MESS+ state swap together: turns deciding while the policy file flips between
    good and corrupt, reloaded each time, are all answered."""
    path = tmp_path / "flipping.onnx"
    shutil.copy(DEFAULT_POLICY, path)
    handle = daemon_factory(policy_config(proxy.base_url, policy_path=str(path)))
    outcomes: list[str] = []

    def ask_many() -> None:
        client = handle.client()
        outcomes.extend(client.ask(f"Quick one {i}", max_tokens=1).done.outcome for i in range(30))

    asker = threading.Thread(target=ask_many)
    asker.start()
    client = handle.client()
    while asker.is_alive():
        path.write_bytes(b"corrupt")
        assert client.reload()["reloaded"] is True
        shutil.copy(DEFAULT_POLICY, path)
        assert client.reload()["reloaded"] is True
    asker.join()
    answered = {"ok", "escalated"}  # escalated: the local answer was unsure and the cloud answered
    assert len(outcomes) == 30 and set(outcomes) <= answered
    assert {row["outcome"] for row in handle.rows()} <= answered


def test_a_policy_failing_at_run_time_leaves_the_turn_to_messplus(
    daemon_factory: Any, proxy: FaultProxy, tmp_path: Path
) -> None:
    path = shape_shifting_policy(tmp_path / "late.onnx", "observation")
    handle = daemon_factory(policy_config(proxy.base_url, policy_path=str(path)))
    client = handle.client()
    assert client.status()["routing"]["policy_error"] is None  # it passed its checks at load
    for i in range(3):
        result = client.ask(f"Hello {i}", max_tokens=2)
        assert result.done.outcome in ("ok", "escalated") and "TMO" not in result.decision.reason
    log = handle.log()
    assert log.count("deciding with MESS+ alone") == 1  # once a minute, not a line per turn; no traceback
    assert "Traceback" not in log and "internal error" not in log
    assert [row["policy_version"] for row in handle.rows()] == [None, None, None]  # each record says so


def test_reload_refuses_a_policy_that_fails_its_run_and_keeps_the_one_it_had(
    daemon_factory: Any, proxy: FaultProxy, tmp_path: Path
) -> None:
    path = tmp_path / "policy.onnx"
    shutil.copy(DEFAULT_POLICY, path)
    handle = daemon_factory(policy_config(proxy.base_url, policy_path=str(path)))
    client = handle.client()
    version = client.status()["routing"]["policy"]
    shape_shifting_policy(path, "mask")
    result = client.reload()
    assert result["reloaded"] is True  # the configuration applied; the policy it names did not
    assert str(path) in result["policy_error"] and "computes log_probs of shape [1, 900000]" in result["policy_error"]
    assert f"keeping policy {version}" in result["policy_error"]
    routing = client.status()["routing"]
    assert routing["policy"] == version and routing["policy_error"] == result["policy_error"]
    assert "TMO policy" in client.ask("Hello", max_tokens=2).decision.reason  # the kept policy routes
    cli = handle.cli("reload")
    assert cli.returncode == 1 and "the routing policy was refused" in cli.stderr and str(path) in cli.stderr


def test_a_policy_answering_nan_is_refused_at_start(daemon_factory: Any, proxy: FaultProxy, tmp_path: Path) -> None:
    handle = daemon_factory(policy_config(proxy.base_url, policy_path=str(nan_policy(tmp_path))))
    routing = handle.client().status()["routing"]
    assert routing["policy"] is None and "non-finite" in routing["policy_error"]
    assert "routing with MESS+ alone" in routing["policy_error"]
    result = handle.client().ask("Hello", max_tokens=2)
    assert result.done.outcome in ("ok", "escalated") and "TMO" not in result.decision.reason


def test_training_from_this_devices_decision_log(tmp_path: Path) -> None:
    """`locod policy train --from-db`: labelled turns of a real decision log become episodes, the action
    not taken estimated by nearest neighbours."""
    from locod.daemon.records import DecisionLog, DecisionRecord, Outcome, labelled_turns
    from locod.policy.tmo_env import LogSource

    log = DecisionLog(tmp_path / "locod.db")
    for i in range(12):
        location = "local" if i % 2 else "cloud"
        record = DecisionRecord(
            session=f"s{i // 3}",
            turn=i % 3,
            request_id=str(i),
            prompt_sha256="0" * 64,
            prompt_chars=20 + i,
            prompt=None,
            task="query",
            location=location,
            model=location,
            reason="test",
            telemetry={"battery_pct": 80, "on_ac": False, "online": True},
        )
        decision = log.begin(record)
        outcome = "escalated" if i == 10 else "ok"  # answered by the cloud after the local answer was unsure
        log.finish(
            decision, Outcome(outcome, location, location, latency_total_ms=300 + i, cost_usd=0.001 * (i % 2 == 0))
        )
        log.label(decision, satisfied=(location == "cloud" or i % 4 == 1), source="user")
    turns = labelled_turns(tmp_path / "locod.db")
    assert len(turns) == 12  # the escalated turn too
    source = LogSource(turns)
    episode = source.episode(random.Random(0))
    assert 1 <= len(episode) <= 3
    turn = episode[0]
    assert turn.mask[0] == 1 and turn.mask[1] == 1  # local and cloud text; no attachments
    assert 0.0 <= turn.quality[0] <= 1.0 and 0.0 <= turn.quality[1] <= 1.0
    policy = train([(source, 1.0)], TrainConfig(steps=2048, rollout=512, seed=1))
    assert isinstance(policy, Policy)


def labelled_local_turn(log: Any, **fields: Any) -> None:
    """One answered local turn in decision log ``log``, labelled good: what training reads of it (``fields``
    override its record's)."""
    from locod.daemon.records import DecisionRecord, Outcome

    record = {"session": "s", "turn": 0, "request_id": "r", "prompt_sha256": "0" * 64, "prompt_chars": 42}
    record |= {"prompt": None, "task": "chat", "location": "local", "model": "local", "reason": "test"}
    decision = log.begin(DecisionRecord(**record | fields))
    log.finish(decision, Outcome("ok", "local", "local"))
    log.label(decision, satisfied=True, source="user")


def test_a_logged_turn_is_observed_as_its_record_holds_it(tmp_path: Path) -> None:
    """Training observes a logged turn from what its record kept: the offered attachments as slots (an
    image, a private one), the telemetry snapshot (an unknown battery read as full), a task this code does
    not know as chat."""
    from locod.daemon.records import DecisionLog, labelled_turns

    log = DecisionLog(tmp_path / "locod.db")
    offered = [
        {"name": "a.png", "kind": "image", "private": False, "relevance": 0.75, "bytes": 10},
        {"name": "notes.txt", "kind": "text", "private": True, "relevance": 0.25, "bytes": 10},
    ]
    telemetry = {"battery_pct": None, "on_ac": True, "online": False, "link": "wifi"}
    labelled_local_turn(log, task="a task of a newer locod", attachments_offered=offered, telemetry=telemetry)
    log.close()
    (turn,) = labelled_turns(tmp_path / "locod.db")
    assert turn.observed == ObsInputs(
        task="chat",
        prompt_chars=42,
        slots=[Slot(0.75, True, False), Slot(0.25, False, True)],
        battery=1.0,
        on_ac=True,
        online=False,
        link="wifi",
    )
