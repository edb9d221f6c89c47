"""The fifteenth walk: a newcomer following the README from a fresh clone, reading what `locod status` and
`locod feedback` print after the quick start. Every test runs the real `locod` command against a real daemon
with the embedded model."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def test_status_says_the_cpu_temperature_is_unknown_instead_of_at_n_a(daemon: Any) -> None:
    """On a machine without a CPU thermal sensor, `locod status`'s device row read "CPU 96% at n/a": at what?
    A clock, a place? Only the code said it was the temperature. Now the row names what is unknown."""
    shown = daemon.cli("status")
    assert shown.returncode == 0, shown.stderr
    device = next(line for line in shown.stdout.splitlines() if line.strip().startswith("device"))
    assert "at n/a" not in device, device
    celsius = daemon.client().status()["telemetry"]["cpu_temp_c"]
    expected = "(temperature n/a)" if celsius is None else f" at {celsius:.0f}°C"
    assert expected in device, device


def test_feedback_says_what_q_is(daemon: Any) -> None:
    """`locod feedback 2 good` ended "Q is now 0.97": the README's feedback line says it trains the router, but
    nothing a newcomer had read said what Q is (only `locod decisions ID` explains it). Now the line says it
    is the shortfall the turns left, and which way it moves the routing."""
    done = daemon.client().ask("Hi", max_tokens=2).done
    labelled = daemon.cli("feedback", str(done.decision), "good")
    assert labelled.returncode == 0, labelled.stderr
    assert f"decision {done.decision} labelled good; satisfaction so far " in labelled.stdout
    assert "queue Q now " in labelled.stdout
    assert "(the shortfall the turns left: a higher Q sends more to the cloud)" in labelled.stdout


def test_one_decision_weighs_two_local_models_in_its_why(daemon_factory: Any, model_path: Path, tmp_path: Path) -> None:
    """With a second local model and one whose file is missing, `locod decisions ID` listed both local models
    under options, yet its `why` said "the only place on offer", and "not on offer this turn: ghost (see
    `why`)" pointed at a `why` that never named ghost. Now `why` says the choice was a trade between the two
    local models, shows the other one's numbers, and names the model left out with its cause."""
    models = [
        {"name": "tiny", "path": str(model_path)},
        {"name": "other", "path": str(model_path)},
        {"name": "ghost", "path": str(tmp_path / "nope.gguf")},
    ]
    local = {"default": "tiny", "n_threads": 2, "models": models}
    handle = daemon_factory({"local": local, "routing": {"explore_c": 0.0}})  # no exploration turn: a trade
    done = handle.client().ask("Hi", max_tokens=2).done
    shown = handle.cli("decisions", str(done.decision))
    assert shown.returncode == 0, shown.stderr
    why = next(line for line in shown.stdout.splitlines() if line.strip().startswith("why"))
    assert "the only place on offer" not in why, why
    assert "the best trade of predicted satisfaction for cost" in why, why
    chosen = shown.stdout.split("answered  by ", 1)[1].split(" (local)", 1)[0]
    rivals = {"tiny", "other", "smollm2-135m-instruct"} - {chosen}  # the embedded model is on offer too
    assert any(f"; {rival}: " in why for rival in rivals) and "likely good" in why, why
    assert "not on offer: ghost (no usable file)" in why, why
    assert "not on offer this turn: ghost (see `why`)" in shown.stdout
