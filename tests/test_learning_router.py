"""Issue #18: the price rule follows the predictor's ranking while keeping the SLA, the local answer's
confidence, the warm-start prior, and the local queue's wait as a cost."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from locod.policy import confidence
from locod.policy.load import WAIT_REF_S, TurnTime, wait_cost
from locod.policy.messplus import DIM, MessPlus, TurnFeatures, vectorize
from locod.policy.price import SlaPrice, breakpoints
from locod.policy.warmstart import Prior, file_sha256, fit_logistic, load_prior, save_prior

COSTS = {"local": 0.05, "cloud": 1.0}


def test_breakpoints_walk_the_upper_hull() -> None:
    # (cost, s): the cheapest first, then up the hull; (0.6, 0.5) lies below the hull and is never chosen
    base, steps = breakpoints([(0.0, 0.2), (0.6, 0.5), (0.5, 0.7), (1.0, 0.9)])
    assert base == 0.2
    assert [pytest.approx(step) for step in steps] == [(1.0, 0.5), (2.5, 0.2)]


def test_price_is_the_least_that_reaches_alpha_by_the_predictions() -> None:
    window = SlaPrice(window=4)
    for s_local in (0.1, 0.3, 0.5, 0.7, 0.9):  # the first turn falls out of the window
        window.add([(0.0, s_local), (1.0, 1.0)])
    # base 0.3 + 0.5 + 0.7 + 0.9 = 2.4; alpha 0.75 needs 0.6 more: the cloud on the 0.3 turn (gain 0.7, price 1/0.7)
    assert window.price(0.75) == pytest.approx(1 / 0.7)
    assert window.price(0.6) == 0.0
    assert window.price(0.85) == pytest.approx(1 / 0.5)  # and the 0.5 turn too
    again = SlaPrice(window=4)
    again.restore(*window.arrays())
    assert again.price(0.85) == window.price(0.85) and again.base_sum == pytest.approx(window.base_sum)


def stream(m: MessPlus, turns: int, seed: int) -> tuple[float, float, float]:
    """Turns of three difficulties the predictor is told exactly (s_hat is the truth); returns satisfaction,
    cloud share, and the share of cloud turns spent on the hardest third."""
    rng = random.Random(seed)
    satisfied = clouds = hardest = 0
    for t in range(turns):
        p_local = rng.choice((0.1, 0.5, 0.9))
        choice = m.choose(COSTS, s_hat={"local": p_local, "cloud": 0.95})
        ok = rng.random() < (0.95 if choice.model == "cloud" else p_local)
        m.settle(t, choice.model, choice.s_hat[choice.key])
        m.label(t, choice.model, vectorize(TurnFeatures("x", "chat")), ok)
        satisfied += ok
        clouds += choice.model == "cloud"
        hardest += choice.model == "cloud" and p_local == 0.1
    return satisfied / turns, clouds / turns, hardest / max(clouds, 1)


def test_price_rule_follows_the_ranking_and_keeps_the_sla() -> None:
    """alpha 0.6 is reached by sending the hardest third (0.1 -> 0.95) to the cloud: local 0.5 on average,
    +0.28. At V = 50 the paper's rule needs Q to build up to 50 / 0.85 first, routing everything locally and
    missing the SLA; with the feed-forward price it sends mostly the hardest turns and meets it."""
    m = MessPlus({"local": 0.5, "cloud": 0.9}, sla=0.6, v=50.0, explore_c=0.0, q_cap=50.0, rng=random.Random(1))
    satisfaction, share, hardest = stream(m, 1500, seed=2)
    assert satisfaction >= 0.6 - 0.01
    assert share < 0.45 and hardest > 0.9  # random routing would need (0.6 - 0.5) / 0.45 = 0.22 ... of every kind


def test_signed_queue_banks_a_surplus_and_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "messplus.npz"
    m = MessPlus({"local": 0.5, "cloud": 0.9}, sla=0.5, v=10.0, explore_c=0.0, q_cap=50.0, path=path)
    for t in range(4):
        m.choose(COSTS, s_hat={"local": 0.5, "cloud": 0.9})
        m.settle(t, "cloud", 0.9)
    assert m.state.q == 0.0 and m.state.z == pytest.approx(-1.6)  # Q floors at 0, Z keeps the surplus
    m.save()
    again = MessPlus({"local": 0.5, "cloud": 0.9}, sla=0.5, v=10.0, explore_c=0.0, q_cap=50.0, path=path)
    assert again.state.z == pytest.approx(-1.6) and again.current_price == pytest.approx(m.current_price)


def test_state_written_before_the_price_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "messplus.npz"
    m = MessPlus({"local": 0.5}, sla=0.5, v=1.0, explore_c=0.0, q_cap=50.0, path=path)
    m.state.q = 2.0
    m.save()
    with np.load(path) as data:
        old = {k: data[k] for k in data.files if not k.startswith(("price_", "conf_")) and k != "z"}
    np.savez(path, **old)
    again = MessPlus({"local": 0.5}, sla=0.5, v=1.0, explore_c=0.0, q_cap=50.0, path=path)
    assert again.state.q == 2.0 and again.state.z == 0.0 and len(again.state.price.turns) == 0


def test_state_with_a_head_of_the_layout_before_per_task_terms_loads_and_a_foreign_one_is_set_aside(
    tmp_path: Path,
) -> None:
    path = tmp_path / "messplus.npz"
    m = MessPlus({"local": 0.5}, sla=0.5, v=1.0, explore_c=0.0, q_cap=50.0, path=path)
    m.confidence_head("local").weights[-1] = 0.7  # a per-task term
    m.state.q = 2.0
    m.save()

    def rewrite(conf_weights: np.ndarray) -> MessPlus:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
        np.savez(path, **{**arrays, "conf_weights": conf_weights})
        return MessPlus({"local": 0.5}, sla=0.5, v=1.0, explore_c=0.0, q_cap=50.0, path=path)

    before = rewrite(np.array([[1.0, *([0.0] * len(confidence.FEATURES)), 0.3]]))  # [a, w, b]: 8 weights
    assert before.state.q == 2.0 and before.confidence_head("local").weights[len(confidence.FEATURES) + 1] == 0.3
    before.save()
    foreign = rewrite(np.zeros((1, 5)))
    assert foreign.state.q == 0.0 and list(tmp_path.glob("messplus.npz.bad-*"))


@pytest.mark.parametrize(
    "damage",
    [
        {"t": -5},
        {"settled": 10, "satisfied_sum": -1e300},
        {"conf_weights": np.full((1, 8), 1e308)},
        {"conf_seen": [-3]},
    ],
)
def test_state_holding_values_no_daemon_writes_is_set_aside(tmp_path: Path, damage: dict[str, Any]) -> None:
    path = tmp_path / "messplus.npz"
    m = MessPlus({"local": 0.5}, sla=0.5, v=1.0, explore_c=0.0, q_cap=50.0, path=path)
    m.confidence_head("local")
    m.state.q = 2.0
    m.save()
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    np.savez(path, **{**arrays, **{k: np.array(v) for k, v in damage.items()}})
    again = MessPlus({"local": 0.5}, sla=0.5, v=1.0, explore_c=0.0, q_cap=50.0, path=path)
    assert again.state.q == 0.0 and again.attained is None and list(tmp_path.glob("messplus.npz.bad-*"))


def answer(logprobs: list[float], tokens: list[str] | None = None) -> confidence.Answer:
    return confidence.Answer("What is the plural of the word mouse?", tokens or ["w"] * len(logprobs), logprobs)


def test_content_tokens_leave_out_what_repeats_the_prompt() -> None:
    a = answer([-0.01, -0.01, -0.01, -2.0, -0.1], ["The", " plural", " of", " mice", "."])
    assert confidence.content_logprobs(a) == [-2.0]
    assert confidence.content_logprobs(a, budget=3) == []
    f = confidence.features(a, max_tokens=10)
    assert f[2] == pytest.approx(-2.0 / 5) and f[0] == pytest.approx(-2.13 / 5 / 5)


def test_confidence_head_starts_as_the_identity_and_learns_that_doubt_means_wrong() -> None:
    head = confidence.ConfidenceHead()
    sure, unsure = confidence.features(answer([-0.05] * 4), 8), confidence.features(answer([-2.5] * 4), 8)
    assert head.predict(0.4, sure, "math") == pytest.approx(0.4) == head.predict(0.4, unsure, "math")
    rng = random.Random(0)
    for _ in range(400):
        head.train(0.4, sure, "math", rng.random() < 0.8)
        head.train(0.4, unsure, "math", rng.random() < 0.1)
    assert head.predict(0.4, sure, "math") > 0.65 and head.predict(0.4, unsure, "math") < 0.2
    assert head.best(0.4, "math") >= head.predict(0.4, sure, "math")


def test_confidence_head_reads_confidence_per_task_and_loads_weights_saved_before_that() -> None:
    """The same sure-sounding answer is usually right on one task and usually wrong on another (a small model
    states wrong trivia confidently): the per-task terms learn that, where one shared slope could not."""
    head = confidence.ConfidenceHead()
    sure, unsure = confidence.features(answer([-0.05] * 4), 8), confidence.features(answer([-2.5] * 4), 8)
    rng = random.Random(1)
    for _ in range(600):
        head.train(0.4, sure, "math", rng.random() < 0.9)
        head.train(0.4, unsure, "math", rng.random() < 0.1)
        head.train(0.4, sure, "chat", rng.random() < 0.2)
        head.train(0.4, unsure, "chat", rng.random() < 0.2)
    assert head.predict(0.4, sure, "math") > 0.7 and head.predict(0.4, sure, "chat") < 0.35
    assert head.best(0.4, "chat") < head.best(0.4, "math")
    before = np.zeros(len(confidence.FEATURES) + 2)  # [a, w, b]: a head saved before the per-task terms
    before[-1] = 2.0
    assert confidence.loadable(before) and not confidence.loadable(np.zeros(5))
    old = confidence.ConfidenceHead(before)
    assert old.predict(0.4, sure, "math") == pytest.approx(1 / (1 + math.exp(-2.0)))


def test_prior_is_found_by_the_ggufs_hash_and_started_from_once(tmp_path: Path) -> None:
    gguf, other = tmp_path / "model.gguf", tmp_path / "other.gguf"
    gguf.write_bytes(b"weights" * 100)
    other.write_bytes(b"WEIGHTS" * 100)  # same size, another hash
    weights = np.zeros(DIM)
    weights[7] = 3.0
    prior = Prior(file_sha256(gguf), gguf.stat().st_size, weights, confidence.identity(), "test trace")
    save_prior(prior, tmp_path / "priors")
    assert load_prior(other, tmp_path / "priors") is None
    loaded = load_prior(gguf, tmp_path / "priors")
    assert loaded is not None and loaded.source == "test trace" and loaded.weights[7] == 3.0
    m = MessPlus({"local": 0.5}, sla=0.5, v=1.0, explore_c=0.0, q_cap=50.0)
    assert m.warm_start("local", loaded) and m.state.weights["local"][7] == 3.0
    m.train("local", vectorize(TurnFeatures("x", "chat")), 1.0)
    assert not m.warm_start("local", loaded)  # a model that has learned keeps what it learned
    assert not m.warm_start("local", None)


def test_fitted_prior_separates_what_the_model_gets_right() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate((rng.normal(size=(400, 3)), np.ones((400, 1))), axis=1)
    y = (x[:, 0] + 0.3 * rng.normal(size=400) > 0).astype(float)
    w = fit_logistic(x, y, np.zeros(4))
    assert w[0] > 1.0 and abs(w[1]) < 0.5


def test_a_long_local_queue_sends_turns_to_the_cloud() -> None:
    times = TurnTime(seconds=2.0)
    times.observe(4.0)
    assert times.seconds == pytest.approx(2.4)
    stopped = TurnTime(seconds=2.0)
    stopped.observe(3600.0)  # a turn that spanned a SIGSTOP counts as a turn 4x the estimate
    assert stopped.seconds == pytest.approx(2.0 + 0.2 * (8.0 - 2.0))
    for _ in range(20):  # a model that really is slower is caught up with
        stopped.observe(30.0)
    assert stopped.seconds == pytest.approx(30.0, rel=0.05)
    assert wait_cost(times.expected_wait_s(0)) == 0.0
    raw_cloud, raw_local = 1.0, 0.05
    m = MessPlus({"local": 0.6, "cloud": 0.9}, sla=0.5, v=1.0, explore_c=0.0, q_cap=50.0)
    for ahead in (0, 10):
        raw = {"local": raw_local + wait_cost(times.expected_wait_s(ahead)), "cloud": raw_cloud}
        top = max(raw.values())
        choice = m.choose({k: v / top for k, v in raw.items()}, s_hat={"local": 0.6, "cloud": 0.9})
        assert choice.model == ("local" if ahead == 0 else "cloud")
    assert wait_cost(WAIT_REF_S) == 1.0


TRACE = Path(__file__).resolve().parent.parent / "policy/data/bigbench_trace.jsonl"


@pytest.mark.parametrize("logprobs", [True, False])
def test_replay_runs_with_and_without_the_answers_log_probs(tmp_path: Path, logprobs: bool) -> None:
    """A trace without log-probs (the format before issue #18) still replays; with them, the escalating
    router runs too. Both beside random routing and the label oracle."""
    pytest.importorskip("matplotlib")
    rows = [json.loads(line) for line in TRACE.read_text().splitlines()[:80]]
    assert all("logprobs" in r["models"]["smollm2-135m-instruct"] for r in rows)
    if not logprobs:
        for r in rows:
            for key in ("tokens", "logprobs", "max_tokens", "gguf_sha256"):
                del r["models"]["smollm2-135m-instruct"][key]
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = Path(__file__).resolve().parent.parent / "scripts/replay.py"
    out = subprocess.run(
        [sys.executable, str(script), "--trace", str(trace), "--split", "half", "--alphas", "0.5", "--out", ""],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    assert "| random needs |" in out and "| label oracle |" in out and "price rule + shadows + prior" in out
    assert ("escalate if unsure" in out) == logprobs
    assert ("no log-probs" in out) != logprobs


def run_replay(trace: Path, *args: str) -> str:
    script = Path(__file__).resolve().parent.parent / "scripts/replay.py"
    command = [sys.executable, str(script), "--trace", str(trace), "--out", "", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=True).stdout


def test_replay_prints_what_knowing_each_tasks_accuracy_allows(tmp_path: Path) -> None:
    """Task A the local model always gets right, task B never, and the cloud gets B right half the time: to
    reach 0.75 over 20 turns the label oracle rescues the 5 turns of B the cloud gets right (share 0.25);
    knowing only B's accuracies, 5 satisfied turns more take all 10 of B to the cloud (0.5); at random,
    every turn (1.0)."""
    pytest.importorskip("matplotlib")
    rows = [
        {
            "dialogue": f"d{i}",
            "turn": 0,
            "task": task,
            "prompt": f"question {i} of task {task}",
            "models": {
                "smollm2-135m-instruct": {"satisfied": int(task == "A"), "usd": 0.0, "energy_j": 5.0, "latency_s": 1},
                "cloud": {"satisfied": int(task == "A" or i % 4 == 1), "usd": 1e-4, "energy_j": 0.2, "latency_s": 1},
            },
        }
        for i, task in enumerate("AB" * 10)
    ]
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run_replay(trace, "--split", "none", "--alphas", "0.75", "--out", str(tmp_path / "img"))
    assert (tmp_path / "img/replay_messplus.png").stat().st_size > 0  # one alpha: one column of plots
    assert "| 0.75 | random needs | 0.750 | 0.000 | 1.000 | 0.00 |" in out
    assert "| 0.75 | label oracle | 0.750 | 0.000 | 0.250 | 1.00 |" in out
    assert "| 0.75 | task oracle | 0.750 | 0.000 | 0.500 | 0.67 |" in out


def test_unseen_trace_replays_from_the_shipped_prior_and_by_its_own_tasks(tmp_path: Path) -> None:
    """policy/data/bigbench_unseen_trace.jsonl holds tasks the shipped prior was not fitted on: it replays
    from that prior (a fresh install's start), and --split task splits its own tasks in two."""
    pytest.importorskip("matplotlib")
    unseen = TRACE.with_name("bigbench_unseen_trace.jsonl")
    trace = tmp_path / "unseen.jsonl"
    trace.write_text("".join(unseen.read_text().splitlines(keepends=True)[:140]))
    shipped = run_replay(trace, "--split", "shipped", "--alphas", "0.6")
    assert "shipped prior (bigbench_trace.jsonl" in shipped and "escalate if unsure + prior" in shipped
    tasks = run_replay(trace, "--split", "task", "--alphas", "0.6")
    assert tasks.count("### tasks ") == 2 and "| task oracle |" in tasks


QUESTIONS = [
    {"task": "capitals", "prompt": "What is the capital of France? Answer with one word.", "gold": ["Paris"]},
    {"task": "capitals", "prompt": "What is the capital of Italy? Answer with one word.", "gold": "Rome"},
    {"task": "sums", "prompt": "What is 2 plus 2? Answer with the number only.", "gold": ["4"], "numeric": True},
    {"task": "sums", "prompt": "What is 30 plus 12? Answer with the number only.", "gold": ["42"], "numeric": True},
]


def build_trace(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(__file__).resolve().parent.parent / "scripts/build_trace.py"
    command = [sys.executable, str(script), "--threads", "1", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_a_trace_of_your_own_questions_and_gguf_replays(tmp_path: Path, model_path: Path) -> None:
    """Routing is reported for the model at hand: build_trace.py answers a question file with any GGUF (here
    the embedded one under another file name, with a space in it), keeps that model's name, and replay.py
    reads whichever one local model a trace holds; its SHA-256 picks the shipped prior."""
    pytest.importorskip("matplotlib")
    gguf = tmp_path / "My Model.Q4_1.gguf"
    gguf.symlink_to(model_path)
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    trace = tmp_path / "mine.jsonl"
    done = build_trace("--questions", str(questions), "--model", str(gguf), "--out", str(trace))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    assert sorted(r["prompt"] for r in rows) == sorted(q["prompt"] for q in QUESTIONS)
    assert all(set(r["models"]) == {"my model.q4_1", "cloud"} for r in rows)
    local = rows[0]["models"]["my model.q4_1"]
    assert local["gguf_sha256"] == file_sha256(model_path) and len(local["tokens"]) == len(local["logprobs"]) > 0
    meta = json.loads(trace.with_suffix(".meta.json").read_text())
    assert meta["source"].startswith("questions.jsonl") and set(meta["local_accuracy"]) == {"capitals", "sums"}
    out = run_replay(trace, "--split", "shipped", "--alphas", "0.6")
    assert "shipped prior" in out and "escalate if unsure + prior" in out


def test_a_bad_question_line_is_named(tmp_path: Path, model_path: Path) -> None:
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps(QUESTIONS[0]) + "\n" + json.dumps({"task": "x", "prompt": "hi"}) + "\n")
    done = build_trace("--questions", str(questions), "--out", str(tmp_path / "t.jsonl"))
    assert done.returncode != 0
    assert f"{questions}:2: missing 'gold'" in done.stderr
