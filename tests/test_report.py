"""`locod report`: the decision log's turns, bucketed over time, drawn as PNG or HTML."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from locod.daemon.history import daily_cost, parse_since, read_history
from locod.daemon.records import DecisionLog, DecisionRecord, Outcome
from locod.errors import RequestError, StorageError

HOUR = 3600.0


def record(location: str) -> DecisionRecord:
    return DecisionRecord("s", 0, "r", "0" * 64, 5, None, "chat", location, location, "test")


def fill(db: Path, now: float) -> None:
    """Six turns in the last three hours: local and cloud, with first-token times, costs and labels."""
    log = DecisionLog(db)
    turns = [  # hours ago, location, first token ms, USD, J, label
        (2.5, "local", 100.0, 0.0, 3.0, (True, "user")),
        (2.4, "cloud", 300.0, 0.002, 0.0, (False, "judge")),
        (1.5, "local", 120.0, 0.0, 4.0, None),
        (0.5, "cloud", 500.0, 0.003, 0.0, (True, "user")),
        (0.4, "local", 140.0, 0.0, 5.0, (True, "explore")),
        (30.0, "local", 100.0, 0.0, 1.0, (True, "user")),  # outside a 3h window
    ]
    for hours, location, first, usd, joules, label in turns:
        decision = log.begin(record(location))
        log.finish(
            decision, Outcome("ok", location, location, latency_first_token_ms=first, cost_usd=usd, energy_j=joules)
        )
        if label:
            log.label(decision, *label)
        # backdated, with the queue and target a routed turn records (routing.columns())
        log.db.execute(
            "UPDATE decisions SET created = ?, q = 1.5, sla = 0.8 WHERE id = ?", [now - hours * HOUR, decision]
        )
    log.close()


def test_history_buckets_the_period(tmp_path: Path) -> None:
    now = time.time()
    fill(tmp_path / "locod.db", now)
    history = read_history(tmp_path / "locod.db", parse_since("3h"), now=now)
    assert history.bucket_s == 300 and history.turns == 5 and history.sla == 0.8
    assert sum(b.cloud for b in history.buckets) == 2
    assert sum(b.labelled for b in history.buckets) == 4 and sum(b.satisfied for b in history.buckets) == 3
    assert history.attained()[-1] == 0.75
    assert sorted(t for b in history.buckets for t in b.first_token_ms["cloud"]) == [300.0, 500.0]
    assert sum(b.labels.get("user", 0) for b in history.buckets) == 2
    assert sum(daily_cost(history).values()) == pytest.approx(0.005)
    assert sum(b.energy_j for b in history.buckets) == 12.0
    assert read_history(tmp_path / "locod.db", parse_since("2d"), now=now).bucket_s == HOUR
    # a century asked for: the period starts at its first turn (30 h ago), so it costs what the log holds
    century = read_history(tmp_path / "locod.db", parse_since("5200w"), now=now)
    assert century.turns == 6 and century.bucket_s == HOUR and len(century.buckets) <= 48


def test_since_and_missing_log_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(RequestError, match="like 30m, 12h, 7d or 4w, got '7 days'"):
        parse_since("7 days")
    with pytest.raises(StorageError, match="no decision log at"):
        read_history(tmp_path / "none.db", 3600)


def _locod(tmp_path: Path, *args: str, python: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCOD_")}
    env.update(LOCOD_STATE_DIR=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "none"))
    command = [*(python or [sys.executable, "-m", "locod.cli"]), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)


def test_report_png_and_html(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    fill(tmp_path / "locod.db", time.time())
    result = _locod(tmp_path, "report", "--since", "3h", "--out", "r.png")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _locod(tmp_path, "report", "--out", "r.html").returncode == 0
    page = (tmp_path / "r.html").read_text()
    assert "data:image/png;base64," in page and "<th>turns</th><td>6 (2 cloud, 33%)</td>" in page


def test_report_without_matplotlib_says_how_to_install_it(tmp_path: Path) -> None:
    fill(tmp_path / "locod.db", time.time())
    # Python's own way to make an import fail: a None entry in sys.modules.
    hide = "import sys; sys.modules['matplotlib'] = None; from locod.cli import main; sys.exit(main())"
    result = _locod(tmp_path, "report", python=[sys.executable, "-c", hide])
    assert result.returncode == 1
    assert "matplotlib, which is not installed: " in result.stderr and "pip install '.[report]'" in result.stderr
    assert not (tmp_path / "report.png").exists()


def test_report_of_an_empty_period(tmp_path: Path) -> None:
    fill(tmp_path / "locod.db", time.time() - 40 * 86400)
    result = _locod(tmp_path, "report", "--since", "7d")
    assert result.returncode == 1 and "no turns in the decision log" in result.stderr


def test_money_reads_as_money_and_day_labels_do_not_overlap(tmp_path: Path) -> None:
    """Without a cap the summary holds two dollar signs, which matplotlib would read as TeX between them;
    four weeks of day bars would label every day, each over the next."""
    import matplotlib.pyplot as plt

    from locod.report import figure

    now = time.time()
    fill(tmp_path / "locod.db", now)
    fig = figure(read_history(tmp_path / "locod.db", parse_since("4w"), now=now), 0.0, "t")
    try:
        fig.canvas.draw()
        money = next(ax for ax in fig.axes if ax.get_title() == "money per day")
        boxes = [label.get_window_extent() for label in money.get_xticklabels() if label.get_text()]
        assert len(boxes) > 1 and all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:]))  # apart, left to right
        (summary,) = fig.axes[-1].texts
        assert "most in a day $" in summary.get_text() and summary.get_parse_math() is False
    finally:
        plt.close(fig)
