"""``locod status``: the running daemon in one line per part (daemon, files, local, cloud, routing,
learning, device, network, queue), then what needs the user's hand."""

from __future__ import annotations

import argparse
from typing import Any

from locod.build import code_digest
from locod.commands.common import connect, print_json
from locod.explain import power_and_network
from locod.protocol import NO_CONFIG_FILE
from locod.terminal import shown
from locod.words import counted, dollars, or_na


def cmd_status(args: argparse.Namespace) -> int:
    with connect(args) as client:
        status = client.status()
    if args.json:
        print_json(status)
        return 0
    t, r, c = status["telemetry"], status["routing"], status["cloud"]
    battery, power, net = power_and_network(t)
    rows = [
        ("daemon", f"locod {status['version']}, pid {status['pid']}, up {status['uptime_s']:.0f} s"),
        ("local", _local_line(status["local"])),
        ("cloud", f"{', '.join(c['models'])}; {_breakers(c)}; {_spending(c)}" if c["models"] else _no_cloud(c)),
        (
            "routing",
            f"mode {r['mode']}, policy {r.get('policy') or 'none (MESS+ alone)'}, SLA {r['sla']:.2f}, "
            f"attained {or_na(r['attained'], '{:.3f}')} (labels where "
            f"given, predictions otherwise) over {counted(r['turns'], 'routed turn')}, Q {r['q']:.2f}, "
            f"{counted(r['shadow_labels'], 'shadow label')} and {counted(r['escalated_labels'], 'escalation label')}"
            + _out_of_reach(r, c),
        ),
        (
            "device",
            f"{battery}{_local_masked(r)}, {power}, power {or_na(t['power_w'], '{:.1f} W')}, "
            f"CPU {or_na(t['cpu_pct'], '{:.0f}%')}{_cpu_temperature(t['cpu_temp_c'])}, "
            f"GPU {or_na(t['gpu_pct'], '{:.0f}%')}, free memory {or_na(t['mem_available_mb'], '{:.0f} MiB')}",
        ),
        (
            "network",
            f"{net} {_link(t['link'])}, {_cloud_probe(t) if c['models'] else 'no cloud endpoint to probe'}, "
            f"RTT {_rtt(t)}, upload "
            f"{t['upload_bps'] / 1e6:.1f} MB/s{'' if t['upload_measured'] else ' (prior)'}",
        ),
        (
            "queue",
            f"{status['queue']['in_flight']} in flight, {status['queue']['waiting_for_local']} waiting "
            f"for the local model{_for_session(status['queue'])}; {counted(status['sessions'], 'session')}",
        ),
    ]
    # A model left out for its file is the local row's to name: "from the task priors (no prior for its GGUF)"
    # said of a text file named .gguf sent a user looking for a prior to fit.
    unavailable = status["local"].get("unavailable", {})  # an older daemon's status has no such field
    learning = {name: p for name, p in r.get("predictors", {}).items() if name not in unavailable}
    if learning:  # after the routing row; an older daemon's status has no such field
        rows.insert(4, ("learning", _predictors(learning)))
    if "db" in status:  # an older daemon's status has no such field
        rows.insert(1, ("files", _files(status)))
    if "http" in status:  # an older daemon's status has no such field
        rows.insert(1, ("http", f"OpenAI-compatible API at {status['http']}" if status["http"] else _http_off(status)))
    lines = [f"{name:>8}  {text}" for name, text in rows] + [f"warning: {w}" for w in _status_warnings(status)]
    for line in lines:  # a prior's `source`, a policy file's error, a model's name: one line each, no escapes
        print(shown(line, layout=False))
    return 0


def _http_off(status: dict[str, Any]) -> str:
    """Why the HTTP API is off: not set, or set in the config since the start and waiting for a restart (which
    the warnings below say), where "set http.listen" sent a user who had just set it looking for a typo."""
    if "http" in status.get("restart_needed", []):  # an older daemon's status has no such field
        return "off until the daemon restarts: the config's [http] changed since it started (below)"
    return "off: set http.listen to serve it (`locod serve --set http.listen=127.0.0.1:8080`; docs/http.md)"


def _local_line(loc: dict[str, Any]) -> str:
    """Every local model, the default first (as the cloud line lists every cloud model), and the cache."""
    unavailable = loc.get("unavailable", {})  # an older daemon's status has no such field
    others = [name for name in loc["models"] if name != loc["default"] and name not in unavailable]
    also = f"; also {', '.join(others)}" if others else ""
    left_out = [name for name in unavailable if name != loc["default"]]
    problems = f"; left out, no usable file (`locod models list`): {', '.join(left_out)}" if left_out else ""
    if loc["default"] in unavailable:
        problems += (
            f"; the default's file is not usable ({unavailable[loc['default']]}): its turns fail until it is back"
        )
    # a client that hung up during a long prompt freed the model, rather than held it to the prompt's end
    stopped = loc.get("prompts_stopped", {"turns": 0})  # an older daemon's status has no such field
    stops = ""
    if stopped["turns"]:
        readings = counted(stopped["turns"], "prompt reading")
        stops = f"; {readings} stopped by a cancel ({stopped['tokens_unread']} tokens unread)"
    cache = loc["cache"]
    memory = f", {loc['resident_mb']} of {loc['memory_budget_mb']} MiB" if "resident_mb" in loc else ""  # older daemon
    return (
        f"{loc['default']}{also} (resident: {', '.join(loc['resident']) or 'none'}{memory}; "
        f"{or_na(loc['tokens_per_s'], '{:.1f}')} tok/s){problems}{stops}; dialogue cache {cache['dialogues']} kept, "
        f"{cache['mb']:.0f}/{cache['limit_mb']:.0f} MiB, "
        f"{counted(cache['hits'], 'hit')}, {counted(cache['misses'], 'miss', 'misses')}"
    )


def _files(status: dict[str, Any]) -> str:
    """Where the running daemon serves and keeps its log: the paths an admin backs up, prunes and gives
    access to, which differ between a service, a user service and a daemon started by hand."""
    config = "none (built-in defaults)" if status["config"] == NO_CONFIG_FILE else status["config"]
    return f"socket {', '.join(status['endpoints'])}; config {config}; decision log {status['db']}"


def _status_warnings(status: dict[str, Any]) -> list[str]:
    """What needs the user's hand: a cloud model without its key, a policy file the daemon could not use or
    that fails on turns, a decision log whose WAL cannot be checkpointed, a daemon running other code than
    this command."""
    warnings = [no_key_warning(name, env) for name, env in status["cloud"].get("no_api_key", {}).items()]
    if status["routing"].get("policy_error"):  # routing.policy_path (or $LOCOD_POLICY) names an unusable file
        warnings.append(f"{status['routing']['policy_error']} (routing.policy_path, or $LOCOD_POLICY)")
    if status["routing"].get("policy_failed_turns"):  # it loaded, then failed on turns' observations
        failed = status["routing"]["policy_failed_turns"]
        warnings.append(
            f"policy {status['routing']['policy']} failed on {failed} turn{'s' * (failed != 1)} since it loaded, "
            "which MESS+ alone decided: the daemon's log says why"
        )
    if status.get("db_warning"):  # an older daemon's status has no such field
        warnings.append(status["db_warning"])
    if status.get("restart_needed"):  # an older daemon's status has no such field
        warnings.append(waits_for_restart(status["restart_needed"]))
    skew = code_skew(status)
    return [*warnings, skew] if skew else warnings


# How to restart the daemon, which locod has no command for: one started by hand, or a service.
RESTART = (
    "`locod stop`, then start it as before, with `locod serve` or scripts/quickstart.sh; a service: "
    "`systemctl --user restart locod` or `sudo systemctl restart locod`"
)


def waits_for_restart(changed: list[str]) -> str:
    """What a reload read but could not apply (paths, the doors, telemetry): said by the reload, and by status
    for as long as it waits, with how to restart."""
    return f"changed in [{'], ['.join(changed)}]: takes effect when the daemon restarts ({RESTART})"


def no_key_warning(name: str, variable: str) -> str:
    """What to do about a cloud model the daemon has no key for: status warns of it, and a reload that leaves
    it so notes it, as the model's first turn to an endpoint that wants a key would fail."""
    return f"cloud model {name} has no API key: set ${variable} (and restart) or its api_key_file (and reload)"


def code_skew(status: dict[str, Any]) -> str | None:
    """What to say when the daemon runs other code than this command's: one started before an upgrade keeps
    its old code (a `git pull` does not change ``__version__``), one of another installation its own."""
    ours = code_digest()
    if "code" not in status:  # a daemon older than the digest
        return (
            f"the daemon (locod {status['version']}) runs code older than this command's (its status has no code "
            f"digest): restart it to run the installed version ({RESTART})"
        )
    if status["code"] is None or ours is None or status["code"] == ours:
        return None
    return (
        f"the daemon runs other code than this command (code {status['code']}, installed {ours}): it was "
        f"started before an upgrade, or from another installation; restart it to run this one ({RESTART})"
    )


def _no_cloud(cloud: dict[str, Any]) -> str:
    """No cloud model: every turn is local (spending is said only if a removed one spent today)."""
    spent = cloud["spent_today_usd"]
    return "none configured: every turn is answered locally ([[cloud.models]], docs/configuration.md)" + (
        f"; today {dollars(spent)}" if spent else ""
    )


def _breakers(cloud: dict[str, Any]) -> str:
    """The breakers' state; with several endpoints and some open, which: "breaker open" alone, beside turns
    answered in the cloud, read as if the cloud were off when only one model's endpoint was."""
    states = cloud.get("breakers", {})  # an older daemon's status has no such field
    opened = [url for url, state in states.items() if state == "open"]
    if not opened or len(opened) == len(states):
        return f"breaker {cloud['breaker']}"
    others = len(states) - len(opened)
    return f"breaker open for {', '.join(opened)} (the {'other is' if others == 1 else f'{others} others are'} closed)"


def _spending(cloud: dict[str, Any]) -> str:
    """Today's spend against the daily cap (and what a reached cap means), and today's cloud share."""
    spent, cap = cloud["spent_today_usd"], cloud["daily_cap_usd"]
    text = f"today {dollars(spent)}"
    if held := cloud.get("held_usd"):  # an older daemon's status has no such field
        text += f" (and up to {dollars(held)} for cloud calls under way)"
    if not cap:
        text += " (no daily cap: cloud.daily_cap_usd)"
    elif spent >= cap:
        text += (
            f" of the {dollars(cap)} cap: {_reached(spent, cap)}, the cloud is off until local midnight, forced "
            "turns included (raise cloud.daily_cap_usd and `locod reload`)"
        )
    else:  # what is left is what each cloud call's most is compared with (a decision's reason quotes it)
        text += f" of the {dollars(cap)} cap ({dollars(max(cap - spent - (held or 0.0), 0.0))} left)"
    answered = cloud.get("answered_today")  # an older daemon's status has no such field
    if answered and answered["turns"]:
        share = f"{answered['cloud'] / answered['turns']:.0%}"
        text += f"; {answered['cloud']} of {counted(answered['turns'], 'turn')} answered in the cloud today ({share})"
    return text


def _reached(spent: float, cap: float) -> str:
    """The cap reached, and by how much it was passed when it was: an endpoint billing past ``max_tokens``
    (or usage reported late) can spend many times the cap, which "reached" alone hid."""
    if dollars(spent) == dollars(cap):  # past it by less than the digits shown: reached
        return "reached"
    return f"passed by {dollars(spent - cap)} ({spent / cap:.1f} times the cap)"


def _local_masked(routing: dict[str, Any]) -> str:
    """Why routing keeps the local models waiting now (a battery about to run flat), as the daemon's decider
    says it (status.routing.local_masked): the decisions' reasons said so, the status line showed only the
    battery's level. An older daemon's status has no such field: nothing is said."""
    why = routing.get("local_masked")
    return f" (local models masked: {why})" if why else ""


def _reachable(value: bool | None) -> str:
    return "not probed yet" if value is None else "reachable" if value else "unreachable"


def _cloud_probe(telemetry: dict[str, Any]) -> str:
    """What the probe found, of what it reached: behind a proxy, the endpoint through the tunnel its calls
    ask for, or the proxy alone (it said "cloud endpoint reachable" while only the proxy was)."""
    reached, proxy = _reachable(telemetry.get("cloud_reachable")), telemetry.get("cloud_proxy")
    probed = telemetry.get("cloud_probed")  # an older daemon's status has no such field
    if probed == "proxy":
        return f"cloud proxy {proxy} {reached} (the endpoint behind it is not probed)"
    return f"cloud endpoint {reached}" + (f" through proxy {proxy}" if probed == "tunnel" else "")


def _link(link: str) -> str:
    return "(no network link)" if link == "none" else f"via {link}"  # "offline via none" read as a typo


def _rtt(telemetry: dict[str, Any]) -> str:
    """The probe's round trip; after a failed probe, the last one measured with its age (a bare "RTT 1 ms"
    beside "unreachable" read as a measurement of now)."""
    ms, age = telemetry["rtt_ms"], telemetry.get("rtt_age_s")
    if ms is None or telemetry.get("cloud_reachable") is not False or age is None:
        return or_na(ms, "{:.0f} ms")
    return f"n/a (the last, {ms:.0f} ms, {age:.0f} s ago)"


def _cpu_temperature(celsius: float | None) -> str:
    """The CPU's temperature after its load (at 52°C); unknown, it says so: a bare "at n/a" read as a missing clock."""
    return " (temperature n/a)" if celsius is None else f" at {celsius:.0f}°C"


def _predictors(predictors: dict[str, dict[str, Any]]) -> str:
    """Where each local model's predictor started and how much it has learned since: a model that starts
    from the task priors routes near chance until a few hundred labels (docs/routing.md). Models alike in
    both share one clause: copies of one GGUF under several settings repeated it word for word."""
    started = {
        None: "the task priors (no prior for its GGUF)",
        "shipped": "the prior shipped for its GGUF",
    }
    alike: dict[str, list[str]] = {}
    for name, p in predictors.items():
        said = (
            started.get(p["prior"], f"your prior {p['prior']}")
            + (f", fitted on {p['fitted_on']}" if p["fitted_on"] else "")
            + f", {counted(p['labels'], 'label')} since"
        )
        alike.setdefault(said, []).append(name)
    return "; ".join(f"{', '.join(names)} from {said}" for said, names in alike.items())


def _out_of_reach(routing: dict[str, Any], cloud: dict[str, Any]) -> str:
    """Why the attained satisfaction stays below the SLA, when no model on offer is predicted to reach it."""
    if not routing["infeasible"]:
        return ""
    capped = cloud["daily_cap_usd"] and cloud["spent_today_usd"] >= cloud["daily_cap_usd"]
    remedy = (
        "raise cloud.daily_cap_usd or lower routing.sla"
        if capped
        else "lower routing.sla"
        if cloud["models"]
        else "configure a cloud model or lower routing.sla"
    )
    return f"; SLA out of reach: no model on offer is predicted to reach it ({remedy})"


def _for_session(queue: dict[str, Any]) -> str:
    """The turns waiting for an earlier turn of their session, when some are (an older daemon says nothing)."""
    waiting = queue.get("waiting_for_session") or 0
    return f", {waiting} for an earlier turn of their session" if waiting else ""
