"""``locod report``: one picture of what the router did, drawn from the decision log with matplotlib.

Panels: satisfaction against the SLA target, the MESS+ queue Q, the cloud share, money per day against the
daily cap, energy, local and cloud first-token time, and the labels collected by kind (feedback and judge on
answers shown, shadow and escalation on local answers graded against the cloud's, as `locod status` counts them).
matplotlib is the ``report`` extra; without it the command says how to install it.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from pathlib import Path
from typing import Any

from locod.daemon.config import CloudModelConfig, Config
from locod.daemon.history import LOCAL_LABELS, History, daily_cost, parse_since, read_history
from locod.daemon.records import NO_LOG
from locod.errors import LocodError, RequestError, StorageError, install_hint
from locod.words import counted

SUFFIXES = (".png", ".html")
MAX_TICKS = 8  # labelled buckets (or days) per axis
LABEL_COLOURS = {
    "user": "tab:blue",
    "judge": "tab:purple",
    "explore": "tab:orange",
    "shadow": "tab:green",
    "escalation": "tab:red",
}
LABEL_NAMES = {"user": "feedback"}  # the log's label source -> the word `locod feedback` and the docs use


def report_file(out: str | Path) -> Path:
    """``--out``: a file of a kind the report is written as, by its suffix."""
    out = Path(out)
    if out.suffix.lower() not in SUFFIXES:
        raise RequestError(f"--out must end in .png or .html, got {str(out)!r}")
    return out


def write_report(config: Config, since: str = "7d", out: str | Path = "report.png") -> Path:
    """Draw the report of the last ``since`` (12h, 7d, 4w) into ``out`` (.png, or .html with the picture inside)."""
    out = report_file(out)
    history = _history(config, since)
    if not history.turns:
        raise LocodError(f"no turns in the decision log {config.db_path} in the last {since}: nothing to draw")
    cloud = config.cloud_model(config.cloud.default) if config.cloud.models else None
    png = render_png(history, config.cloud.daily_cap_usd, title=f"locod: the last {since}", cloud=cloud)
    if out.suffix.lower() == ".png":
        out.write_bytes(png)
    else:
        out.write_text(_html(history, png, since, config.cloud.daily_cap_usd, cloud), encoding="utf-8")
    return out


def _history(config: Config, since: str) -> History:
    """The log's turns of the last ``since``. Before any daemon wrote a log there is nothing to draw, as in an
    empty one (exit 1), not a log that cannot be used (exit 4)."""
    try:
        return read_history(config.db_path, parse_since(since))
    except StorageError as exc:
        if exc.code != NO_LOG:
            raise
        raise LocodError(
            f"no decision log at {config.db_path} yet (no daemon has answered a turn): nothing to draw"
        ) from None


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise LocodError(
            f"locod report draws with matplotlib, which is not installed: {install_hint('report')}"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def render_png(history: History, daily_cap_usd: float, title: str, cloud: CloudModelConfig | None = None) -> bytes:
    plt = _pyplot()
    fig = figure(history, daily_cap_usd, title, cloud)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()


def figure(history: History, daily_cap_usd: float, title: str, cloud: CloudModelConfig | None = None) -> Any:
    """The report's matplotlib figure: eight panels, the last one the period's totals as text."""
    plt = _pyplot()
    fig, axes = plt.subplots(4, 2, figsize=(12, 13), constrained_layout=True)
    fig.suptitle(f"{title}: {counted(history.turns, 'turn')}", fontsize=14)
    times = [dt.datetime.fromtimestamp(b.start) for b in history.buckets]
    width = history.bucket_s / 86400 * 0.8  # bar width in days, matplotlib's date unit
    _satisfaction(axes[0][0], history, times, width)
    axes[0][1].plot(times, [b.mean_q for b in history.buckets], marker="o", ms=3, color="tab:red")
    axes[0][1].set(title="MESS+ queue Q (mean per turn; grows while the SLA is behind)", ylabel="Q")
    axes[1][0].bar(times, [100 * b.cloud_share for b in history.buckets], width, color="tab:cyan")
    axes[1][0].set(title="cloud share of turns", ylabel="%", ylim=(0, 100))
    _money(axes[1][1], history, daily_cap_usd)
    scale, unit = _energy_unit(history)
    axes[2][0].bar(times, [b.energy_j / scale for b in history.buckets], width, color="tab:olive")
    axes[2][0].set(title="device energy (estimated from tokens generated locally)", ylabel=unit)
    _first_token(axes[2][1], history, times)
    _labels(axes[3][0], history, times, width)
    _summary(axes[3][1], history, daily_cap_usd, cloud)
    ticks = times[:: -(-len(times) // MAX_TICKS)]
    half = dt.timedelta(seconds=history.bucket_s / 2)  # every time panel spans the period, drawn or empty:
    # an empty one spanned 1970 to now, all its ticks on one spot ("04:38" over "04:39")
    for ax in [a for row in axes for a in row][:-1]:
        if ax.get_title() != "money per day":
            ax.set_xlim(times[0] - half, times[-1] + half)
            ax.set_xticks(ticks)
            ax.tick_params(axis="x", labelrotation=30)
            ax.xaxis.set_major_formatter(_date_format(history))
            ax.set_xlabel("local time" if history.bucket_s < 86400 else "local day (month-day)")
    return fig


def _satisfaction(ax: Any, history: History, times: list[dt.datetime], width: float) -> None:
    rates = [b.satisfaction for b in history.buckets]
    bars = [100 * r if r is not None else 0 for r in rates]
    ax.bar(times, bars, width, color="tab:green", alpha=0.35, label=f"per {_bucket_name(history.bucket_s)}")
    attained = [None if a is None else 100 * a for a in history.attained()]
    ax.plot(times, attained, color="tab:green", marker="o", ms=3, label="so far")
    if history.sla is not None:
        ax.axhline(100 * history.sla, color="tab:red", ls="--", label=f"SLA target {history.sla:.0%}")
    ax.set(title="satisfied share of labelled routed turns", ylabel="%", ylim=(0, 105))
    ax.legend(loc="lower left")


def _first_token(ax: Any, history: History, times: list[dt.datetime]) -> None:
    """The median first-token time of each place that answered in the period: a place without one (no cloud
    configured, or none of its answers timed) had an empty line in the legend, as if it had been measured."""
    for location, colour in (("local", "tab:green"), ("cloud", "tab:blue")):
        values = [b.median_first_token(location) for b in history.buckets]
        if any(v is not None for v in values):
            ax.plot(times, values, marker="o", ms=3, color=colour, label=location)
    ax.set(title="first-token time (median)", ylabel="ms")
    if ax.get_lines():
        ax.legend(loc="upper left")


def _bucket_name(bucket_s: float) -> str:
    """A bucket's length in words: ``day``, ``hour``, ``15 minutes``."""
    return {86400: "day", 3600: "hour", 60: "minute"}.get(int(bucket_s), f"{bucket_s / 60:.0f} minutes")


def _money(ax: Any, history: History, cap: float) -> None:
    days = daily_cost(history)
    ax.bar(range(len(days)), list(days.values()), color="tab:brown")
    step = -(-len(days) // MAX_TICKS)  # one label a bar would overlap past a week or so
    ax.set_xticks(range(0, len(days), step), [d[5:] for d in list(days)[::step]], rotation=30)
    if cap:
        ax.axhline(cap, color="tab:red", ls="--", label=f"daily cap ${cap:.2f}")
        ax.legend(loc="upper left")
    ax.set(title="money per day", ylabel="USD", xlabel="local day (month-day)")
    ax.set_ylim(bottom=0)  # days of local turns alone drew $0 in the middle of an axis from -0.04 to 0.04


def _labels(ax: Any, history: History, times: list[dt.datetime], width: float) -> None:
    sources = sorted({s for b in history.buckets for s in b.labels})
    bottom = [0] * len(times)
    for source in sources:
        counts = [b.labels.get(source, 0) for b in history.buckets]
        name = LABEL_NAMES.get(source, source)
        ax.bar(times, counts, width, bottom=bottom, label=name, color=LABEL_COLOURS.get(source))
        bottom = [x + y for x, y in zip(bottom, counts)]
    ax.set(title="labels collected", ylabel="labels")
    if sources:
        ax.legend(loc="upper left")


def _summary(ax: Any, history: History, cap: float, cloud: CloudModelConfig | None) -> None:
    ax.axis("off")
    text = "\n".join(f"{k}: {v}" for k, v in summary(history, cap, cloud).items())
    ax.text(0.0, 1.0, text, va="top", family="monospace", parse_math=False)  # "$0.01 ... $0.02" is not TeX


def summary(history: History, cap: float, cloud: CloudModelConfig | None = None) -> dict[str, str]:
    """The period's totals, as shown beside the charts; with ``cloud`` (the default cloud model), what the
    turns would have cost had it answered the local ones too."""
    buckets = history.buckets
    turns, in_cloud = history.turns, sum(b.cloud for b in buckets)
    labelled, satisfied = sum(b.labelled for b in buckets), sum(b.satisfied for b in buckets)
    routed, estimated = sum(b.routed for b in buckets), sum(b.estimated for b in buckets)
    days = daily_cost(history)
    labels: dict[str, int] = {}
    for b in buckets:
        for source, n in b.labels.items():
            labels[source] = labels.get(source, 0) + n
    return {
        "turns": f"{turns} ({in_cloud} cloud, {in_cloud / turns:.0%})",
        "satisfaction": f"{satisfied}/{labelled} labelled of {routed} routed turns"
        + (f" = {satisfied / labelled:.1%}" if labelled else ""),
        "SLA target": "n/a" if history.sla is None else f"{history.sla:.0%}",
        "SLA attained": "see `locod status` (counts predictions too)",
        "money": f"${sum(days.values()):.5f}, most in a day ${max(days.values()):.5f}"
        + (f" (cap ${cap:.2f})" if cap else ""),
        **({"all in the cloud": _all_cloud(history, cloud)} if cloud else {}),
        **({"priced from text": f"{counted(estimated, 'turn')} (no usage reported)"} if estimated else {}),
        "energy": f"{sum(b.energy_j for b in buckets) / _energy_unit(history)[0]:.2f} {_energy_unit(history)[1]}",
        **_labels_said(labels),
    }


def _labels_said(labels: dict[str, int]) -> dict[str, str]:
    """The period's labels: those of the answers shown by source, then the local labels (of local answers
    the user never saw) in `locod status`'s words. "labels: none" beside status's "2 shadow labels" read as
    a contradiction. Two short rows: one long one narrowed the money panel beside it."""
    named = sorted((LABEL_NAMES.get(source, source), n) for source, n in labels.items() if source not in LOCAL_LABELS)
    shown = ", ".join(counted(n, f"{name} label") for name, n in named) or "none"
    shadow, escalation = (labels.get(kind, 0) for kind in LOCAL_LABELS)
    return {
        "labels": f"{shown} on answers shown",
        "local labels": f"{counted(shadow, 'shadow label')} and {counted(escalation, 'escalation label')}",
    }


def _all_cloud(history: History, cloud: CloudModelConfig) -> str:
    """The money had ``cloud`` answered every turn: what was spent, plus the local answers' tokens (as the
    local model counts them: an estimate) at its prices."""
    tokens_in, tokens_out = (sum(b.local_tokens[i] for b in history.buckets) for i in (0, 1))
    usd = sum(b.cost_usd for b in history.buckets) + cloud.price(tokens_in, tokens_out, 0)
    return f"about ${usd:.5f} (local answers at {cloud.name}'s prices)"


def _energy_unit(history: History) -> tuple[float, str]:
    """Wh once a bucket reaches one, else joules (a few short turns are a few joules)."""
    return (3600.0, "Wh") if max(b.energy_j for b in history.buckets) >= 3600 else (1.0, "J")


def _date_format(history: History) -> Any:
    from matplotlib.dates import DateFormatter

    return DateFormatter("%H:%M" if history.bucket_s < 86400 else "%m-%d")


def _html(history: History, png: bytes, since: str, cap: float, cloud: CloudModelConfig | None) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary(history, cap, cloud).items()
    )
    picture = base64.b64encode(png).decode()
    return (
        f"<!doctype html><meta charset='utf-8'><title>locod report: the last {html.escape(since)}</title>"
        f"<h1>locod: the last {html.escape(since)}</h1><table>{rows}</table>"
        f"<img alt='locod routing report' src='data:image/png;base64,{picture}'>\n"
    )
