"""MESS+: queue arithmetic and the rule on hand-computed cases, SLA convergence on a synthetic stream with
known probabilities, persistence, and inputs that must not poison the model."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest

from locod.policy.messplus import MessPlus, TurnFeatures, vectorize

X = vectorize(TurnFeatures(prompt="hello there", task="chat"))


def same(x: tuple[np.ndarray, np.ndarray], keys: dict[str, float]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every option described by the same features."""
    return {k: x for k in keys}


def router(**kwargs: object) -> MessPlus:
    params: dict[str, object] = {"sla": 0.8, "v": 1.0, "explore_c": 0.0, "q_cap": 50.0}
    params.update(kwargs)
    return MessPlus({"local": 0.3, "cloud": 0.9}, **params)  # type: ignore[arg-type]


def test_cold_start_predictions_are_the_priors() -> None:
    m = router()
    s_hat = {name: m.satisfaction(X, name) for name in ("local", "cloud")}
    assert s_hat["local"] == pytest.approx(0.3) and s_hat["cloud"] == pytest.approx(0.9)


def test_queue_arithmetic_by_hand() -> None:
    m = router()
    m.settle(1, "local", 0.5)  # Q = 0 + 0.8 - 0.5
    assert m.state.q == pytest.approx(0.3)
    m.settle(2, "cloud", 0.9)  # Q = 0.3 + 0.8 - 0.9
    assert m.state.q == pytest.approx(0.2)
    m.label(2, "cloud", X, satisfied=False)  # the label replaces the prediction: Q += 0.9 - 0
    assert m.state.q == pytest.approx(1.1)
    m.label(1, "local", X, satisfied=True)  # Q += 0.5 - 1
    assert m.state.q == pytest.approx(0.6)
    assert m.attained == pytest.approx(0.5)  # one satisfied, one not
    m.settle(3, "cloud", 0.0)
    m.settle(4, "cloud", 1.0)
    assert m.state.q == pytest.approx(0.6 + 0.8 - 0.0 + 0.8 - 1.0)


def test_queue_never_goes_below_zero_or_above_its_cap() -> None:
    m = router(q_cap=1.0)
    m.settle(1, "cloud", 1.0)
    assert m.state.q == 0.0
    for i in range(10):
        m.settle(10 + i, "local", 0.0)
    assert m.state.q == 1.0


def test_rule_by_hand() -> None:
    """objective = V * (cost + extra) + (Z' + V * price) * (alpha - s_hat), price from the window of predictions,
    Z' = CATCH_UP * Z behind the SLA and Z ahead of it."""
    costs = {"local": 0.1, "cloud": 1.0}
    m = router(sla=0.25)  # local's 0.3 alone meets the SLA: price 0, only cost counts
    choice = m.choose(costs, xs=same(X, costs))
    assert choice.model == "local" and choice.price == 0.0
    m = router()  # SLA 0.8: the window's one turn needs the cloud at the price (1.0 - 0.1) / (0.9 - 0.3) = 1.5
    m.state.z = 2.5  # far behind the SLA, counted 4 times: 0.1 + 11.5 * (0.8 - 0.3) = 5.85 against 1.0 + 11.5 * -0.1
    choice = m.choose(costs, xs=same(X, costs))
    assert choice.model == "cloud" and choice.price == pytest.approx(11.5)
    assert choice.s_hat == pytest.approx({"local": 0.3, "cloud": 0.9})
    assert m.choose(costs, xs=same(X, costs), extra={"cloud": 5.9}).model == "cloud"  # -0.15 + 5.9 < 5.85
    assert m.choose(costs, xs=same(X, costs), extra={"cloud": 6.1}).model == "local"  # -0.15 + 6.1 > 5.85
    m.state.z = -1.0  # a banked surplus lowers the price to 0.5: 0.1 + 0.25 = 0.35 against 1.0 - 0.05 = 0.95
    assert m.choose(costs, xs=same(X, costs)).model == "local"
    assert m.choose(costs, xs=same(X, costs), extra={"local": 0.7}).model == "cloud"  # the policy's term can tip it


def test_exploration_probability_decays_as_t_to_the_minus_quarter() -> None:
    m = router(explore_c=0.5)
    m.state.t = 16
    assert m.explore_probability == pytest.approx(0.25)
    m.state.t = 0
    assert router(explore_c=2.0).explore_probability == 1.0


def test_sla_is_met_at_low_cost_on_a_known_stream() -> None:
    """Local satisfies easy prompts 90 % and hard ones 20 % of the time; cloud 95 % always. The SLA 0.8 is
    met over 4,000 turns while most easy turns stay local."""
    rng = random.Random(7)
    m = MessPlus({"local": 0.5, "cloud": 0.8}, sla=0.8, v=2.0, explore_c=0.3, q_cap=50.0, rng=random.Random(8))
    costs = {"local": 0.05, "cloud": 1.0}
    satisfied, cloud_turns = 0, 0
    for t in range(4000):
        hard = rng.random() < 0.5
        x = vectorize(TurnFeatures(prompt="prove the theorem carefully" if hard else "say hi", task="chat"))
        choice = m.choose(costs, xs=same(x, costs))
        p = 0.95 if choice.model == "cloud" else (0.2 if hard else 0.9)
        ok = rng.random() < p
        m.settle(t, choice.model, choice.s_hat[choice.key])
        m.label(t, choice.model, x, ok)
        satisfied += ok
        cloud_turns += choice.model == "cloud"
    assert satisfied / 4000 >= 0.8 - 0.01
    assert m.attained == pytest.approx(satisfied / 4000)
    assert cloud_turns / 4000 < 0.7  # always-cloud would be 1.0
    assert not m.infeasible


def test_infeasible_sla_is_detected_and_q_capped() -> None:
    m = MessPlus({"a": 0.4, "b": 0.5}, sla=0.99, v=1.0, explore_c=0.0, q_cap=5.0)
    for t in range(200):
        choice = m.choose({"a": 0.1, "b": 1.0}, xs=same(X, {"a": 0, "b": 0}))
        m.settle(t, choice.model, choice.s_hat[choice.key])
        m.label(t, choice.model, X, satisfied=t % 2 == 0)
    assert m.state.q == 5.0 and m.infeasible


def test_an_sla_no_model_on_offer_reaches_is_reported_early() -> None:
    """A small local model alone (no cloud) against a high SLA: said after the first turns, while Q is far
    from its cap."""
    m = MessPlus({"local": 0.3}, sla=0.8, v=20.0, explore_c=0.0, q_cap=50.0)
    for t in range(25):
        choice = m.choose({"local": 0.0}, xs={"local": X})
        m.settle(t, choice.model, choice.s_hat[choice.key])
        assert m.infeasible == (t + 1 >= 20), t
    assert m.state.q < 0.5 * m.q_cap


def test_state_survives_save_and_load(tmp_path: Path) -> None:
    path = tmp_path / "messplus.npz"
    m = router(path=path)
    for i in range(5):
        m.settle(i, "local", 0.4)
    m.label(0, "local", X, satisfied=True)
    m.choose({"local": 0.1, "cloud": 1.0}, xs=same(X, {"local": 0, "cloud": 0}))
    m.save()
    again = router(path=path)
    assert again.state.q == pytest.approx(m.state.q) and again.state.t == m.state.t == 1
    assert again.state.pending == m.state.pending and again.state.labels == {"local": 1}
    assert np.array_equal(again.state.weights["local"], m.state.weights["local"])
    assert again.attained == pytest.approx(m.attained)


def test_a_new_target_starts_the_queue_over_and_the_same_target_keeps_it(tmp_path: Path) -> None:
    """Q is the shortfall against the target it was built under: after a lowered SLA it sent turns on to the
    cloud although the satisfaction reached was above the new target. A reload (the state in memory) or a
    restart (the file) with another target starts it over; the same target carries it on."""
    path = tmp_path / "messplus.npz"
    strict = router(sla=0.99, path=path)
    for i in range(5):
        strict.settle(i, "local", 0.3)
    strict.save()
    assert strict.state.q > 0
    assert router(sla=0.99, path=path).state.q == pytest.approx(strict.state.q)
    assert router(sla=0.6, path=path).state.q == 0.0
    lowered = router(sla=0.6, state=strict.state)
    assert lowered.state.q == lowered.state.z == 0.0 and lowered.attained == pytest.approx(0.3)


@pytest.mark.parametrize("content", [b"not a numpy file", b""])
def test_corrupt_state_is_set_aside_and_the_prior_used(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "messplus.npz"
    path.write_bytes(content)
    m = router(path=path)
    assert m.state.q == 0.0 and m.satisfaction(X, "local") == pytest.approx(0.3)
    assert not path.exists() and len(list(tmp_path.glob("messplus.npz.bad-*"))) == 1
    assert "is unusable" in caplog.text


def test_version_mismatch_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "messplus.npz"
    np.savez(path, version=np.array(99), dim=np.array(3))
    assert router(path=path).state.t == 0
    assert list(tmp_path.glob("messplus.npz.bad-*"))


def test_nan_and_inf_features_do_not_poison_the_predictor() -> None:
    m = router()
    bad = vectorize(TurnFeatures(prompt="x", task="chat", max_relevance=math.nan, n_attachments=3))
    worse = vectorize(TurnFeatures(prompt="y", task="chat", max_relevance=math.inf))
    assert np.all(np.isfinite(bad[1])) and np.all(np.isfinite(worse[1]))
    for _ in range(50):
        m.train("local", bad, 1.0)
        m.train("local", worse, 0.0)
    assert np.all(np.isfinite(m.state.weights["local"]))
    assert 0.0 < m.satisfaction(X, "local") < 1.0


def test_predictor_learns_which_prompts_the_local_model_handles() -> None:
    m = router()
    easy = vectorize(TurnFeatures(prompt="what is two plus two", task="math"))
    hard = vectorize(TurnFeatures(prompt="derive the fourier transform of a gaussian", task="math"))
    for _ in range(200):
        m.train("local", easy, 1.0)
        m.train("local", hard, 0.0)
    s_easy, s_hard = m.satisfaction(easy, "local"), m.satisfaction(hard, "local")
    assert s_easy > 0.8 and s_hard < 0.2


def test_one_turn_predicted_at_once_equals_each_candidate_alone() -> None:
    m = router()
    rng = random.Random(3)
    prompt = "what does the chart in this photo show about battery life"
    for _ in range(100):  # train both heads on varied attachments so every weight matters
        f = TurnFeatures(
            prompt, "query", rng.randint(0, 3), rng.random(), rng.random() < 0.5, withheld_relevance=rng.random()
        )
        m.train(rng.choice(["local", "cloud"]), vectorize(f), float(rng.random() < 0.5))
    ways = [
        (TurnFeatures(prompt, "query", withheld_relevance=0.9), "local"),
        (TurnFeatures(prompt, "query"), "cloud"),
        (TurnFeatures(prompt, "query", 1, 0.9, True, position=2, prev_cloud=True, withheld_relevance=0.4), "cloud"),
        (TurnFeatures(prompt, "query", 2, 0.9, True, position=2, withheld_relevance=math.nan), "cloud"),
    ]
    at_once = m.satisfaction_of_turn([f for f, _ in ways], [model for _, model in ways])
    assert at_once == pytest.approx([m.satisfaction(vectorize(f), model) for f, model in ways], abs=1e-12)
    assert len(set(at_once)) == len(ways)


@pytest.mark.parametrize(
    "broken",
    [
        {"weights": np.zeros((2, 10))},  # a valid zip of the right version, weights of the wrong width
        {"weights": np.zeros(7)},
        {"names": np.array([["local"]])},
        {"labels": np.zeros(5, dtype=np.int64)},
        {"pending_s": np.zeros(3)},
        {"file_sizes": np.zeros(2, dtype=np.int64)},  # a size for a model the file does not name
        {"sla": np.zeros(2)},
    ],
)
def test_wrongly_shaped_state_is_set_aside_on_load(tmp_path: Path, broken: dict[str, np.ndarray]) -> None:
    path = tmp_path / "messplus.npz"
    m = router(path=path)
    m.settle(1, "local", 0.4)
    m.start_over_if_replaced("local", 1000)
    m.save()
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    np.savez(path, **{**arrays, **broken})
    again = router(path=path)
    assert again.state.settled == 0 and list(tmp_path.glob("messplus.npz.bad-*"))
    choice = again.choose({"local": 0.1, "cloud": 1.0}, xs=same(X, {"local": 0, "cloud": 0}))  # routes again
    assert choice.model in ("local", "cloud")
