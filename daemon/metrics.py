"""``GET /metrics``: the daemon's state in Prometheus' text format, read when scraped.

Turn counts, tokens, money, energy and the latency histograms come from the decision log itself (every
turn, whichever door it came through, since the log began), so they always agree with ``locod decisions``;
gauges (SLA attainment, Q, queue, breaker) from the live objects. Nothing is counted twice or kept apart.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from locod.daemon.config import redacted_url
from locod.daemon.tallies import HISTOGRAMS, Finished

if TYPE_CHECKING:
    from locod.daemon.server import Daemon


class DaemonCollector(Collector):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        finished = self.daemon.records.finished.read()  # one read of the log for the scrape
        yield from _turn_counters(finished)
        yield _histogram("locod_decision_seconds", "Time to decide where a turn runs.", finished, "latency_decide_ms")
        yield _histogram(
            "locod_first_token_seconds",
            "Time from acceptance to the first answer token, by where the turn finally ran.",
            finished,
            "latency_first_token_ms",
            by_place=True,
        )
        yield from self._gauges()

    def _gauges(self) -> Iterator[Metric]:
        d = self.daemon
        routing = d.learner.status()
        values = {
            "locod_sla_target": ("The SLA: the share of turns that should satisfy.", routing["sla"]),
            "locod_sla_attainment": (
                "The share of routed turns that satisfied (unlabelled: as predicted).",
                routing["attained"],
            ),
            "locod_q": ("MESS+'s virtual queue: how far behind the SLA routing is.", routing["q"]),
            "locod_turns_in_flight": ("Turns admitted and not answered yet.", d.in_flight()),
            "locod_local_queue_depth": ("Turns waiting for the local model.", d.local.gate.waiting),
            "locod_spent_today_usd": ("Money spent since local midnight.", d.records.spent_today()),
        }
        for name, (doc, value) in values.items():
            if value is not None:
                yield GaugeMetricFamily(name, doc, value=float(value))
        breakers = GaugeMetricFamily(
            "locod_cloud_breaker_open", "1 while a cloud endpoint's circuit breaker is open.", labels=["endpoint"]
        )
        for url, breaker in d.cloud.endpoint_breakers().items():
            breakers.add_metric([redacted_url(url)], float(breaker.blocking))
        yield breakers


def _turn_counters(finished: Finished) -> Iterator[Metric]:
    """Finished turns by place and outcome, and the tokens, money and energy they used by place."""
    turns = CounterMetricFamily("locod_turns", "Finished turns.", labels=["location", "outcome"])
    tokens = CounterMetricFamily("locod_tokens", "Tokens in prompts and answers.", labels=["location", "direction"])
    money = CounterMetricFamily("locod_cost_usd", "Money spent (USD).", labels=["location"])
    energy = CounterMetricFamily("locod_energy_joules", "Energy spent on answers.", labels=["location"])
    used: dict[str, list[float]] = {}  # per location, summed over outcomes
    for row in finished.totals():
        turns.add_metric([row["location"], row["outcome"]], row["turns"])
        sums = used.setdefault(row["location"], [0.0] * 4)
        for i, name in enumerate(("tokens_in", "tokens_out", "cost_usd", "energy_j")):
            sums[i] += row[name]
    for where, (tokens_in, tokens_out, usd, joules) in used.items():
        tokens.add_metric([where, "in"], tokens_in)
        tokens.add_metric([where, "out"], tokens_out)
        money.add_metric([where], usd)
        energy.add_metric([where], joules)
    return iter((turns, tokens, money, energy))


def _histogram(name: str, doc: str, finished: Finished, column: str, by_place: bool = False) -> Metric:
    """A latency column's histogram, in seconds (the log holds milliseconds); ``by_place``: one per place the
    turns ran, labelled ``location``, as local and cloud answers differ by an order of magnitude."""
    if not by_place:
        return HistogramMetricFamily(name, doc, **_buckets(finished.histogram(column), column))
    family = HistogramMetricFamily(name, doc, labels=["location"])
    for where in finished.places():
        family.add_metric([where], **_buckets(finished.histogram(column, where), column))
    return family


def _buckets(histogram: tuple[list[int], int, float], column: str) -> dict[str, Any]:
    counts, count, total_ms = histogram
    buckets = [(repr(b), c) for b, c in zip(HISTOGRAMS[column], counts)] + [("+Inf", count)]
    return {"buckets": buckets, "sum_value": total_ms / 1000}


def registry(daemon: Daemon) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(DaemonCollector(daemon))
    return reg
