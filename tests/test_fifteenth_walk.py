"""The fifteenth walk: a newcomer following the README from a fresh clone, reading what `locod status` and
`locod feedback` print after the quick start. Every test runs the real `locod` command against a real daemon
with the embedded model."""

from __future__ import annotations

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
