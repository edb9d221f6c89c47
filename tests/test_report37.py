"""`locod report` counts the labels `locod status` counts, in its words; a report of a few minutes labels each
time panel's minutes once, apart."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from locod.daemon.history import parse_since, read_history
from locod.daemon.records import DecisionLog, DecisionRecord, JudgedAnswer, Outcome, ShadowResult

from .conftest import cloud_config, wait_for
from .faultproxy import FaultProxy

LOCAL = "smollm2-135m-instruct"


def test_report_says_the_shadow_labels_status_says(daemon_factory: Any, proxy: FaultProxy) -> None:
    """The walk: cloud turns with shadow answers; status said "2 shadow labels", the report "labels: none"."""
    pytest.importorskip("matplotlib")
    cloud = cloud_config(proxy.base_url, timeout_s=60.0)
    handle = daemon_factory({**cloud, "routing": {**cloud["routing"], "shadow": "always"}})
    asked = [handle.client().ask(q, max_tokens=8, temperature=0.0) for q in ("What is 2 + 2?", "Name a fruit.")]
    assert [turn.decision.location for turn in asked] == ["cloud", "cloud"]
    wait_for(lambda: all(r["shadow"] for r in handle.rows()), 120, "both shadow answers")
    # a shadow answer's label is learned just after its grade is written to the record
    client = handle.client()
    wait_for(lambda: client.status()["routing"]["shadow_labels"] == 2, 60, "both shadow labels")
    said = "2 shadow labels and 0 escalation labels"
    assert said in handle.cli("status").stdout
    out = handle.home / "r.html"
    result = handle.cli("report", "--since", "1h", "--out", str(out))
    assert result.returncode == 0, result.stderr
    page = out.read_text()
    assert f"<th>labels</th><td>none on answers shown</td></tr><tr><th>local labels</th><td>{said}</td>" in page


def _turn(log: DecisionLog, outcome: str, now: float) -> int:
    decision = log.begin(DecisionRecord("s", 0, "r", "0" * 64, 5, None, "chat", "local", LOCAL, "test"))
    log.finish(decision, Outcome(outcome, "cloud", "cloud-model", latency_first_token_ms=50.0, cost_usd=0.001))
    log.db.execute("UPDATE decisions SET created = ?, q = 1.0, sla = 0.8 WHERE id = ?", [now - 90, decision])
    return decision


def test_every_kind_of_label_is_counted_as_status_counts_it(tmp_path: Path) -> None:
    """Feedback and judge labels of the answers shown by source; shadow and escalation labels (the local
    model's, of answers never shown) as DecisionLog.local_labels, which `locod status` starts from, counts them."""
    pytest.importorskip("matplotlib")
    from locod.report import summary

    now, log = time.time(), DecisionLog(tmp_path / "locod.db")
    shadowed, judged, escalated, unlabelled = (_turn(log, o, now) for o in ("ok", "ok", "escalated", "escalated"))
    log.shadow(shadowed, ShadowResult(LOCAL, True, "overlap", 8, 100.0))
    log.label(shadowed, True, "user")
    log.label(judged, False, "judge")
    log.judged(escalated, JudgedAnswer(LOCAL, (0.1,), 0.4, 0.3, kept=False, label=False), 0.001)
    log.judged(unlabelled, JudgedAnswer(LOCAL, (0.1,), 0.4, 0.3, kept=False), 0.001)  # a cloud answer of no words
    assert log.local_labels() == (1, 1)
    log.close()
    said = summary(read_history(tmp_path / "locod.db", parse_since("1h"), now=now), 0.0)
    assert said["labels"] == "1 feedback label, 1 judge label on answers shown"
    assert said["local labels"] == "1 shadow label and 1 escalation label"


def test_a_report_of_minutes_labels_each_minute_once_on_every_panel(tmp_path: Path) -> None:
    """A log of a few minutes with no labels and no routed queue: the empty panels spanned 1970 to now, so
    their minute ticks fell on one spot ("04:38" over "04:39")."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from locod.report import figure

    now, log = time.time(), DecisionLog(tmp_path / "locod.db")
    for minutes_ago in (4.0, 2.0, 0.1):
        decision = log.begin(DecisionRecord("s", 0, "r", "0" * 64, 5, None, "chat", "cloud", "cloud", "test"))
        log.finish(decision, Outcome("ok", "cloud", "cloud", latency_first_token_ms=50.0, cost_usd=0.001))
        log.db.execute("UPDATE decisions SET created = ? WHERE id = ?", [now - minutes_ago * 60, decision])
    log.close()
    history = read_history(tmp_path / "locod.db", parse_since("7d"), now=now)
    assert history.bucket_s == 60
    fig = figure(history, 0.0, "t")
    try:
        fig.canvas.draw()
        for ax in fig.axes[:-1]:
            if ax.get_title() == "money per day":
                continue
            ticks = [label for label in ax.get_xticklabels() if label.get_text()]
            texts = [label.get_text() for label in ticks]
            assert len(texts) >= 4 and len(set(texts)) == len(texts), (ax.get_title(), texts)
            assert all(len(t) == 5 and t[2] == ":" for t in texts)  # minutes: HH:MM
            boxes = [label.get_window_extent() for label in ticks]
            assert all(b.x0 - a.x0 >= 10 for a, b in zip(boxes, boxes[1:])), ax.get_title()  # apart, left to right
    finally:
        plt.close(fig)
