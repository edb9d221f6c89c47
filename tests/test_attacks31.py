"""Round thirty-one of attacks on a running daemon, where the user's money is: the cloud's cost against
``cloud.daily_cap_usd``. Each test is one way in that broke, and now holds. Real daemon, real SQLite, the
loopback cloud behind the recording proxy (tests/faultproxy.py); a cloud call kept in flight by the proxy
(``hold``) until the test lets it go, never by a sleep.

Prices here make a turn's worst case easy to reckon: output at $1,000 a million tokens (a tenth of a cent a
token), input free, so a turn of ``max_tokens`` 8 may cost at most $0.008.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from locod.client import Client, TurnResult, attachment
from locod.daemon.history import daily_cost, read_history
from locod.daemon.records import DecisionLog, DecisionRecord, Outcome
from locod.daemon.tallies import local_midnight
from locod.daemon.typed_toml import tomllib
from locod.protocol import Attachment

from .conftest import SECRET, DaemonHandle, cloud_config, wait_for, write_config
from .faultproxy import Fault, FaultProxy
from .test_attacks26 import held_open
from .test_escalation import _daemon, _head
from .test_http import http_daemon

MAX_TOKENS = 8
MOST = MAX_TOKENS * 1000 / 1e6  # a turn's worst case: 8 tokens of answer at $1,000 a million
CAP = 2.5 * MOST  # two turns' worst cases fit, a third's does not


def capped_config(base_url: str, mode: str = "cloud") -> dict[str, Any]:
    config = cloud_config(base_url, mode, timeout_s=300.0, daily_cap_usd=CAP)
    config["cloud"]["models"][0].update(usd_per_mtok_in=0.0, usd_per_mtok_out=1000.0)
    return config


def spent_in_log(handle: DaemonHandle) -> float:
    return sum(r["cost_usd"] or 0.0 for r in handle.rows())


def metric(base: str, name: str) -> float:
    with urllib.request.urlopen(f"{base}/metrics", timeout=60) as response:
        text = response.read().decode()
    return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE))


@pytest.fixture
def capped(daemon_factory: Any, proxy: FaultProxy) -> tuple[DaemonHandle, str]:
    """A daemon with the HTTP door whose turns go to the cloud (routing.mode = cloud) under a cap of two
    turns' worst case."""
    return http_daemon(daemon_factory, capped_config(proxy.base_url))


def test_turns_decided_together_cannot_each_spend_what_is_left_of_the_cap(
    capped: tuple[DaemonHandle, str], proxy: FaultProxy
) -> None:
    """Four cloud turns at once, two through each door (socket streaming, HTTP not), with room left under the
    cap for two turns' worst case. Each was decided against today's spend, which counted a turn only once it
    had finished: all four went to the cloud and could spend twice what was left. Now a cloud turn holds its
    worst case against the cap from its decision until its cost is counted, so the third and fourth are
    answered locally, told why, and what was spent stays under the cap; status, the log and /metrics agree."""
    handle, base = capped
    held = Fault(kind="hold")  # every cloud call waits for the test
    proxy.set(held)
    sockets = [Client(handle.endpoint) for _ in range(2)]
    chats = [c.chat("Say one word.", max_tokens=MAX_TOKENS) for c in sockets]
    with ThreadPoolExecutor(2) as pool:
        opened = list(pool.map(next, chats))  # each turn's decision frame: it is decided and accepted
    posts = [held_open(base, [{"role": "user", "content": f"Say word {i}."}]) for i in range(2)]
    wait_for(lambda: len(handle.rows()) == 4, 300, "all four turns decided")
    assert handle.client().status()["cloud"]["held_usd"] == pytest.approx(2 * MOST)  # the two calls under way
    assert "for cloud calls under way" in handle.cli("status").stdout
    held.released.set()
    answers = [TurnResult.of([first, *rest]) for first, rest in zip(opened, chats)]
    bodies = []
    for conn in posts:
        response = conn.getresponse()
        assert response.status == 200
        bodies.append(json.loads(response.read()))
        conn.close()
    rows = handle.rows()
    assert sorted(r["location"] for r in rows) == ["cloud", "cloud", "local", "local"]
    assert len(proxy.chat_requests()) == 2
    for row in rows:
        if row["location"] == "local":
            assert "daily_cap_usd" in row["reason"], row["reason"]
    told = [a.decision.notice for a in answers] + [b["locod"].get("notice") for b in bodies]
    assert sum("daily_cap_usd" in (notice or "") for notice in told) == 2
    spent = spent_in_log(handle)
    assert 0 < spent <= CAP
    status = handle.client().status()["cloud"]
    assert status["spent_today_usd"] == pytest.approx(spent)
    assert status["held_usd"] == 0
    assert metric(base, "locod_cost_usd_total") == pytest.approx(spent)
    assert metric(base, "locod_spent_today_usd") == pytest.approx(spent)


def test_a_forced_cloud_turn_whose_worst_case_passes_the_cap_is_answered_locally(
    capped: tuple[DaemonHandle, str], proxy: FaultProxy
) -> None:
    """With a little of the cap left (not reached), a cloud turn that a client forces, names, or that
    routing.mode = cloud sends, went to the cloud whatever its max_tokens could cost: one turn of a long
    answer spent many times what was left. Now, as routed turns are, it is kept local when its worst case
    passes what is left, and the client is told with the numbers and the key (both doors); a turn whose
    worst case fits still goes."""
    handle, base = capped
    client = handle.client()
    for options in ({}, {"force": "cloud"}, {"model": "cloud-small"}):
        result = client.ask("Say one word.", max_tokens=3 * MAX_TOKENS, **options)  # worst case: 3 x MOST > CAP
        assert result.decision.location == "local", options
        assert "daily_cap_usd" in (result.decision.notice or ""), result.decision.notice
    body = json.dumps({"model": "cloud-small", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 24})
    request = urllib.request.Request(f"{base}/v1/chat/completions", body.encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        answer = json.loads(response.read())
    assert answer["locod"]["location"] == "local"
    assert "daily_cap_usd" in answer["locod"]["notice"]
    assert answer["choices"][0]["message"]["content"].startswith("[locod: answered locally")
    assert proxy.chat_requests() == []
    assert client.ask("Say one word.", max_tokens=MAX_TOKENS).decision.location == "cloud"  # its worst case fits
    assert spent_in_log(handle) <= CAP


def test_a_documents_excerpts_are_priced_against_the_cap(
    daemon_factory: Any, proxy: FaultProxy, tmp_path: Path
) -> None:
    """A cloud turn is sent the excerpts of the documents it uploads (up to attachments.doc_token_budget
    tokens), but was priced against the cap by its messages alone: with a long document a turn the cap let
    through cost many times what was left. Now the excerpts are priced too: the turn is kept local, and says
    so, while the same question without the document still goes."""
    config = cloud_config(proxy.base_url, timeout_s=300.0, daily_cap_usd=0.05)
    config["cloud"]["models"][0].update(usd_per_mtok_in=100.0, usd_per_mtok_out=0.0)  # input: $0.0001 a token
    handle = daemon_factory(config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    doc = tmp_path / "notes.txt"
    doc.write_text("The quarterly plan covers budgets, hiring and travel. " * 80)  # ~1,100 tokens of excerpts
    client = handle.client()
    result = client.ask("What does the plan cover?", attachments=[attachment(doc)], max_tokens=MAX_TOKENS)
    assert result.decision.location == "local"
    assert "daily_cap_usd" in (result.decision.notice or ""), result.decision.notice
    assert proxy.chat_requests() == []
    assert client.ask("What does the plan cover?", max_tokens=MAX_TOKENS).decision.location == "cloud"
    assert spent_in_log(handle) <= 0.05


def test_the_reports_money_per_day_is_the_caps_and_status_spend(
    daemon_factory: Any, proxy: FaultProxy, tmp_path: Path
) -> None:
    """`locod report`'s money per day ("the daily cap's day") counted a turn on the day it began, and a turn
    still running at the most it may cost; the cap and `locod status` count a turn on the day it finished,
    and one running at nothing yet. A turn across midnight showed on a day the cap never counted it (a day
    over its cap, to the eye), and a report drawn during a turn showed its hold as spent. Now the report
    counts as the cap does, and agrees with status, before and after a restart."""
    handle = daemon_factory(capped_config(proxy.base_url), extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    client = handle.client()
    assert client.ask("Say one word.", max_tokens=MAX_TOKENS).decision.location == "cloud"
    held = Fault(kind="hold", times=1)
    proxy.set(held)
    running = Client(handle.endpoint).chat("Say one more word.", max_tokens=MAX_TOKENS)
    assert next(running).location == "cloud"
    wait_for(lambda: proxy.chat_requests()[1:], 120, "the second turn at the cloud")
    today = time.strftime("%Y-%m-%d")
    spent = client.status()["cloud"]["spent_today_usd"]
    assert 0 < spent == pytest.approx(spent_in_log(handle) - MOST)  # the row of the turn running holds MOST
    assert daily_cost(read_history(handle.db_path, 86400))[today] == pytest.approx(spent)
    held.released.set()
    list(running)
    handle.stop()
    midnight = local_midnight()
    across = midnight + min(60.0, (time.time() - midnight) / 2)  # begun before midnight, finished after it
    conn = sqlite3.connect(handle.db_path)
    with conn:
        conn.execute("UPDATE decisions SET created = ?, finished = ? WHERE id = 1", [midnight - 60, across])
    conn.close()
    handle = daemon_factory(capped_config(proxy.base_url), name="d", extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    spent = handle.client().status()["cloud"]["spent_today_usd"]
    assert spent == pytest.approx(spent_in_log(handle))
    days = daily_cost(read_history(handle.db_path, 2 * 86400))
    assert days[today] == pytest.approx(spent)
    assert sum(days.values()) == pytest.approx(spent)


def test_an_images_bytes_are_not_priced_as_prompt_tokens(daemon_factory: Any, proxy: FaultProxy) -> None:
    """A cloud answer whose endpoint reports no usage is priced from its text, and the text was each
    message's content as a string: an image's whole base64 data URL with it, thousands of "tokens" for one
    photo on top of its usd_per_image, recorded as spent, counted against the cap, and far past what the
    cap had held for the turn. Now only the text parts are counted, and the image once, at usd_per_image."""
    config = capped_config(proxy.base_url)
    config["cloud"].update(daily_cap_usd=1.0)
    config["cloud"]["models"][0].update(usd_per_mtok_in=100.0, usd_per_image=0.01)
    handle = daemon_factory(config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    noise = np.random.default_rng(7).integers(0, 256, (240, 320, 3), np.uint8)  # JPEG keeps noise: ~100 kB
    photo = Attachment("image", "noise.png", data=cv2.imencode(".png", noise)[1].tobytes())
    done = handle.client().ask("Describe it.", attachments=[photo], max_tokens=MAX_TOKENS).done
    [row] = handle.rows()
    assert row["backend"] == "cloud" and row["images_sent"] == 1 and row["cost_estimated"] == 1
    assert row["tokens_in"] < 50, row["tokens_in"]  # "Describe it." and its message's few tokens
    assert row["cost_usd"] == pytest.approx(row["tokens_in"] * 100e-6 + row["tokens_out"] * 1000e-6 + 0.01)
    assert done.cost_usd == pytest.approx(row["cost_usd"])


def test_a_cloud_calls_hold_lasts_across_midnight_until_its_cost_is_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call decided at 23:59:59 and answered after midnight: its hold counts against the cap on both days
    until it is answered (the new day's tally, read from the log, has no pending row), then its cost counts on
    the day it finished, in the hold's place. The clock is moved, not waited for."""
    clock = [local_midnight() + 86400 - 1]  # 23:59:59 tonight
    monkeypatch.setattr(time, "time", lambda: clock[0])
    log = DecisionLog(tmp_path / "locod.db")
    try:
        decision = log.begin(DecisionRecord("s", 0, "r", "0" * 64, 2, None, "chat", "cloud", "c", "forced"))
        held = log.today.hold(0.05)
        assert (log.spent_today(), log.committed_today()) == (0.0, pytest.approx(0.05))
        clock[0] += 2  # past midnight, the call still under way
        assert (log.spent_today(), log.committed_today()) == (0.0, pytest.approx(0.05))
        log.finish(decision, Outcome("ok", "cloud", "c", cost_usd=0.01), held)
        assert (log.spent_today(), log.committed_today()) == (pytest.approx(0.01), pytest.approx(0.01))
        log.today.release(held)  # what a turn's end does again: nothing, once counted
        assert log.committed_today() == pytest.approx(0.01)
    finally:
        log.close()


def test_a_turn_that_may_escalate_holds_its_cloud_call_and_is_not_planned_past_the_cap(
    daemon_factory: Any, tmp_path: Path, proxy: FaultProxy
) -> None:
    """Answer locally, escalate if unsure: the cloud call comes after the local answer, seconds after the
    decision that planned it against the cap. With another cloud call under way and room for one turn's worst
    case, a turn was planned to escalate as if the cap were untouched, and escalated. Now the call under way
    holds its most, the escalation is not planned (the local answer stands, saying why), and a reload that set
    the cap and prices mid-day is what the holds and the plan are reckoned by."""
    handle = _daemon(daemon_factory, tmp_path, proxy, _head(min_weight=1000.0, bias=10.0), "unsure")
    config = tomllib.loads(handle.config_path.read_text())
    config["cloud"]["daily_cap_usd"] = 1.5 * MOST
    config["cloud"]["models"][0].update(usd_per_mtok_in=0.0, usd_per_mtok_out=1000.0)
    write_config(handle.config_path, config)
    assert handle.client().reload()["reloaded"]
    held = Fault(kind="hold", times=1)
    proxy.set(held)
    forced = Client(handle.endpoint).chat("Say one word.", force="cloud", max_tokens=MAX_TOKENS)
    assert next(forced).location == "cloud"
    wait_for(lambda: proxy.chat_requests(), 120, "the forced turn at the cloud")
    result = handle.client().ask("What is the plural of mouse?", max_tokens=MAX_TOKENS, temperature=0.0)
    assert "escalates to" not in result.decision.reason and "daily_cap_usd" in result.decision.reason
    assert result.escalated is None and result.done.location == "local"
    held.released.set()
    list(forced)
    assert len(proxy.chat_requests()) == 1
    assert spent_in_log(handle) <= 1.5 * MOST
