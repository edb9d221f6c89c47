"""Soak round 31: a daemon that runs for months must say what is true of it after any number of turns: with no
cloud call under way, nothing is held against the daily cap, however the calls before overlapped.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tests.conftest import SECRET, cloud_config, write_config
from tests.faultproxy import FaultProxy

CLIENTS = 4
TURNS_EACH = 8


def test_with_no_call_under_way_nothing_is_held_however_the_calls_overlapped(
    daemon_factory: Any, proxy: FaultProxy
) -> None:
    """Each cloud call's worst case is added to what is held when it is decided and taken off when it ends.
    Overlapping calls end in another order than they began, and floating-point sums taken apart in another
    order leave a residue (0.1 + 0.2 - 0.1 - 0.2 is 2.8e-17): with nothing under way, the daemon still held
    a few 1e-17 dollars, or less than nothing (`held_usd` -0.0 in status), for as long as it ran, and a turn
    the cap kept local was told that part of today's spend was "held for calls under way". Now, with no hold
    left, nothing is held, exactly."""
    config = cloud_config(proxy.base_url, timeout_s=300.0, daily_cap_usd=100.0, breaker_failures=1000)
    config["cloud"]["models"][0].update(usd_per_mtok_in=200.0, usd_per_mtok_out=400.0)  # no binary fractions
    handle = daemon_factory(config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})

    def turns(worker: int) -> list[str]:
        client = handle.client(turn_timeout_s=300)
        return [
            client.ask("What is the capital of France? " + "Please. " * (worker * 3 + turn), max_tokens=4).done.outcome
            for turn in range(TURNS_EACH)
        ]

    with ThreadPoolExecutor(CLIENTS) as pool:
        outcomes = [o for each in pool.map(turns, range(CLIENTS)) for o in each]
    assert len(outcomes) == CLIENTS * TURNS_EACH and set(outcomes) <= {"ok", "fallback"}  # each a cloud call
    client = handle.client(turn_timeout_s=300)
    status = client.status()
    assert status["queue"]["in_flight"] == 0
    held = status["cloud"]["held_usd"]
    assert held == 0 and math.copysign(1.0, held) == 1.0, held

    config["cloud"]["daily_cap_usd"] = 1e-6  # reached: a forced cloud turn is kept local and told why
    write_config(handle.config_path, config)
    client.reload()
    kept = client.ask("Say one word.", force="cloud", max_tokens=4)
    assert kept.decision.location == "local"
    assert "daily_cap_usd" in (kept.decision.notice or ""), kept.decision.notice
    assert "held for calls under way" not in (kept.decision.notice or ""), kept.decision.notice
