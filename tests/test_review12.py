"""Review 12's findings on the twelfth walk and eleventh attack round's change, each against the real part it
is about (a real daemon, the real model and the loopback cloud behind the fault proxy) where one can run."""

from __future__ import annotations

import json
from typing import Any

from .conftest import SECRET, wait_for
from .faultproxy import FaultProxy
from .test_routing import auto_config


def test_a_judge_whose_verdict_could_pass_the_daily_cap_does_not_grade(daemon_factory: Any, proxy: FaultProxy) -> None:
    """Review finding: the judge graded whatever the daily cap said, while status says a reached cap keeps
    the cloud off; a reasoning judge may now take 1,024 tokens ($0.002 here), more than the cap ($0.001)
    that a 4-token turn ($0.00003) fits."""
    config = auto_config(proxy.base_url, judge=True, explore_c=10.0)  # every turn explores: the judge grades it
    config["cloud"]["daily_cap_usd"] = 0.001
    config["cloud"]["models"][0]["max_tokens_param"] = "max_completion_tokens"
    handle = daemon_factory(config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    done = handle.client().ask("What is 2+2?", max_tokens=4, temperature=0.0).done
    wait_for(lambda: f"judge does not grade decision {done.decision}" in handle.log(), what="the judge's refusal")
    assert not [s for s in proxy.chat_requests() if "You grade answers" in json.dumps(s.body)]
    assert handle.rows()[0]["satisfied"] is None
