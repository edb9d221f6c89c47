"""Review 12's findings on the twelfth walk and eleventh attack round's change, each against the real part it
is about (a real daemon, the real model and the loopback cloud behind the fault proxy) where one can run."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from locod.commands.turns import _why_kept
from locod.policy.confidence import identity
from locod.policy.messplus import DIM
from locod.policy.warmstart import Prior, file_sha256, load_prior, save_prior

from .conftest import SECRET, wait_for
from .faultproxy import FaultProxy
from .test_policy import image, policy_config
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


def test_a_kept_local_answer_says_a_better_cloud_chance_only_when_there_was_one() -> None:
    """Review finding: `ask -v` said "the cloud's better chance was not worth its cost" of a local answer
    judged 100% likely good against a cloud at 85%, which the rule kept because it was the better one
    (test_twelfth_walk's sure answer shows it against the real daemon)."""
    record = {"action": "local-m", "s_hat": {"local-m": 0.5, "other-local": 0.99, "cloud-m|cloud": 0.85}}
    sure = {"s_answered": 1.0, "explored": False}
    assert _why_kept(record, sure, {"cloud-m"}) == "the cloud was not predicted to do better (85%)"
    unsure = {"s_answered": 0.6, "explored": False}  # another local model's 99% is no cloud's chance
    assert "the cloud's better chance (85%) was not worth its cost" in _why_kept(record, unsure, {"cloud-m"})
    assert _why_kept(record, {**unsure, "explored": True}, {"cloud-m"}) == "an exploration turn kept it"


def test_an_unusable_prior_is_named_by_its_own_file(
    tmp_path: Path, model_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Review finding: a prior of another head layout was named `<folder>/<its hash>.npz`, the name
    fit_prior.py gives it, which a prior the user copied in under another name does not have."""
    other_layout = Prior(file_sha256(model_path), model_path.stat().st_size, np.zeros(DIM + 8), identity(), "mine")
    (tmp_path / "mine.npz").write_bytes(save_prior(other_layout, tmp_path / "fitted").read_bytes())
    with caplog.at_level(logging.WARNING):
        assert load_prior(model_path, tmp_path, DIM) is None
    assert f"predictor prior {tmp_path / 'mine.npz'} for {model_path.name} is unusable" in caplog.text


def test_a_cap_passed_by_the_images_mess_alone_uploads_says_so(
    daemon_factory: Any, proxy: FaultProxy, tmp_path: Path
) -> None:
    """Review finding: without a policy MESS+ uploads the images it finds relevant, and a turn whose image
    ($0.01) passed the cap ($0.005) was said to be kept local because a text answer "may cost $0.0000057" (what
    a text answer, which fits, costs) and a lower max_tokens would let it."""
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not onnx")
    config = policy_config(proxy.base_url, policy_path=str(broken))  # routing with MESS+ alone
    config["cloud"]["models"][0]["usd_per_image"] = 0.01
    config["cloud"]["daily_cap_usd"] = 0.005
    handle = daemon_factory(config)
    asked = handle.client().ask("What is in this picture?", attachments=[image(120, 90)], max_tokens=8)
    reason = asked.decision.reason
    assert asked.decision.location == "local" and "cloud masked: $0.005 is left of today's $0.005 cap" in reason
    assert "the images MESS+ would upload (usd_per_image) pass it" in reason and "max_tokens" not in reason
