"""`locod decisions ID`: why one turn went where it did, in words, from its decision record alone.

The table of `locod decisions` keeps one line a turn; a user asking about one turn wants what the rule
weighed (each option's predicted chance of a good answer and its cost), what was ruled out, what happened
after the choice (a local answer kept or escalated, a cloud call that fell back) and how to label it.
"""

from __future__ import annotations

import time
from typing import Any

from locod.protocol import ANSWERED
from locod.terminal import shown
from locod.words import dollars

OUTCOMES = {
    "fallback": "the cloud call failed, so the local model answered instead",
    "escalated": "the local answer was not sure enough, so the cloud answered instead, from the start",
    "error": "failed",
    "cancelled": "cancelled before its answer was whole",
    "interrupted": "interrupted: the daemon stopped during the turn",
    "pending": "still being answered",
}


def explain(row: dict[str, Any]) -> list[str]:
    """The lines that say why decision ``row`` (a `decisions` record, JSON columns parsed) went where it did.
    Every line is escaped whole: a record holds what clients, models and configs named, and any process that
    can write the log file can write any column, with any type (then its columns are listed as stored)."""
    try:
        lines = _explained(row)
    except (TypeError, ValueError, KeyError, AttributeError):  # text in a number column, a list for an object
        lines = [f"decision {row.get('id')}: its record is not as locod writes one (another program wrote it?)"]
        lines += [_line(column, _cell(value)) for column, value in row.items() if value is not None]
    return [shown(line, layout=False) for line in lines]  # model names, outcomes, a prior's words: any column


def _explained(row: dict[str, Any]) -> list[str]:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["created"]))
    session = _cell(row["session"])
    lines = [f"decision {row['id']}, {when}, {_cell(row['task'])} turn {row['turn']} of session {session}"]
    lines.append(_line("answered", _answer(row)))
    lines.append(_line("why", _cell(row["reason"])))
    lines += _options(row)
    lines += _confidence(row)
    lines += _shadow(row)
    lines += _target(row)
    lines += _attachments(row)
    lines.append(_line("device", _device(row.get("telemetry") or {})))
    lines.append(_line("label", _label(row)))
    lines.append(_line("more", f"every column: locod decisions {row['id']} --json"))
    return lines


def _line(name: str, text: str) -> str:
    return f"{name:>10}  {text}"


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def _answer(row: dict[str, Any]) -> str:
    where = row.get("backend") or row["location"]
    text = f"by {_cell(row['model'])} ({where})"
    if row["outcome"] != "ok":
        text = f"{OUTCOMES.get(row['outcome'], row['outcome'])}; {text}"
    if row.get("error"):
        text += f": {_cell(row['error'])}"
    if row.get("tokens_out") is not None and row.get("latency_total_ms") is not None:
        text += f"; {row['tokens_out']} tokens in {row['latency_total_ms'] / 1000:.1f} s"
    if row.get("cost_usd") is not None:
        text += f", {dollars(row['cost_usd'])}" + (" (estimated from characters)" if row.get("cost_estimated") else "")
    return text


def _options(row: dict[str, Any]) -> list[str]:
    """Each action the rule weighed, with its predicted chance of a good answer and its cost (1: the dearest
    action on offer), and the models with no action on offer at all."""
    s_hat, costs, mask = row.get("s_hat") or {}, row.get("costs") or {}, row.get("mask") or {}
    if not s_hat:
        chose = "none weighed: the request or the config chose where it runs (--force, --model, routing.mode)"
        return [_line("options", chose)]
    heading = (
        "predicted chance of a good answer (s_hat: `likely good` in why), and relative cost "
        "(1.00: the dearest on offer)"
    )
    lines = [_line("options", heading)]
    for key, s in sorted(s_hat.items(), key=lambda item: -item[1]):
        model, _, upload = key.partition("|")
        chosen = _role(row, key)
        sends = f" ({_upload(upload)})" if upload else ""  # a bare name: local, or cloud without the policy
        lines.append(_line("", f"{model}{sends}: {s:.0%}, relative cost {costs.get(key, 0.0):.2f}{chosen}"))
    offered = {key.partition("|")[0] for key in s_hat}
    ruled_out = sorted({key.partition("|")[0] for key, allowed in mask.items() if not allowed} - offered)
    if ruled_out:
        lines.append(_line("", f"not on offer this turn: {', '.join(ruled_out)} (see `why`)"))
    return lines


def _role(row: dict[str, Any], key: str) -> str:
    """What became of the chosen action, and of the cloud action an escalated turn went to."""
    if key == row.get("action"):
        return " <- answered first, then escalated" if row["outcome"] == "escalated" else " <- chosen"
    if row["outcome"] == "escalated" and key.partition("|")[0] == row["model"]:
        return " <- answered after the escalation"
    return ""


def _upload(action: str) -> str:
    """``cloud`` or ``cloud+0,2``: the cloud, with which of the turn's attachment slots uploaded."""
    slots = action.partition("+")[2]
    return "cloud, uploading attachment slots " + slots if slots else "cloud, no attachment uploaded"


# What became of a local answer its confidence did not keep, by the turn's outcome: the escalation's cloud call
# may fail, and then the local model answers again (or a held whole answer is shown, which counts as kept).
DROPPED = {
    "escalated": "not shown: the cloud answered instead",
    "fallback": "not shown: the turn escalated, the cloud failed, and the local model answered again from the start",
    "": "not shown: the turn escalated to the cloud",
}


def _confidence(row: dict[str, Any]) -> list[str]:
    """The local answer's own confidence, where it was read: why it was shown or escalated."""
    judged = row.get("confidence")
    if not judged:
        return []
    verdict = "shown to the user" if judged.get("kept") else DROPPED.get(row["outcome"], DROPPED[""])
    return [
        _line(
            "confidence",
            f"{judged['model']}'s answer, read from its tokens' log-probabilities: {judged['s_answered']:.0%} "
            f"likely good ({judged['s_prompt']:.0%} from the prompt alone); {verdict}",
        )
    ]


def _shadow(row: dict[str, Any]) -> list[str]:
    """A cloud-answered turn's background local answer (routing.shadow), graded against the cloud's."""
    shadow = row.get("shadow")
    if not shadow:
        return []
    grade = "good" if shadow["satisfied"] else "bad"
    grader = {"overlap": "word overlap", "judge": "the judge (routing.judge)"}.get(shadow["grader"], shadow["grader"])
    return [
        _line(
            "shadow",
            f"{shadow['model']} answered it too, in the background (routing.shadow), graded {grade} against the "
            f"cloud's answer by {grader}: a label for the local model",
        )
    ]


def _target(row: dict[str, Any]) -> list[str]:
    if row.get("sla") is None:
        return []
    return [
        _line(
            "target",
            f"SLA {row['sla']:.2f} (routing.sla: the share of turns to answer well); queue Q {row['q']:.2f} "
            "(the shortfall the earlier turns left: a higher Q sends more to the cloud)",
        )
    ]


def _attachments(row: dict[str, Any]) -> list[str]:
    offered = row.get("attachments_offered") or []
    if not offered:
        return []
    sent = set(row.get("attachments_sent") or [])

    def fate(attachment: dict[str, Any]) -> str:
        image = attachment.get("kind") == "image"
        if attachment["name"] in sent and not attachment.get("private"):  # a private one of the same name stayed
            if image and attachment.get("jpeg_bytes"):  # what left the device is the re-encoded copy
                size, jpeg = f"{attachment['width']}x{attachment['height']}", _kilobytes(attachment["jpeg_bytes"])
                return f"uploaded as a {size} JPEG of {jpeg}, from {_kilobytes(attachment['bytes'])}"
            return "uploaded" if image else "uploaded: the excerpts that fit attachments.doc_token_budget"
        kept = "private, kept on device" if attachment.get("private") else "kept on device"
        return f"{kept}; no model saw it, as local models read no images" if image else kept

    return [_line("attached", "; ".join(f"{_cell(a['name'])} ({fate(a)})" for a in offered))]


def _kilobytes(size: int) -> str:
    return f"{size / 1000:,.0f} kB" if size >= 1000 else f"{size} bytes"


def power_and_network(telemetry: dict[str, Any]) -> tuple[str, str, str]:
    """The battery, the power source and the link in words (a telemetry snapshot's row): as `locod status`
    and a decision's explanation both say them."""
    battery, on_ac, online = telemetry.get("battery_pct"), telemetry.get("on_ac"), telemetry.get("online")
    return (
        "no battery" if battery is None else f"battery {battery:.0f}%",
        "on AC" if on_ac else "on battery" if on_ac is False else "power source unknown",
        "online" if online else "offline" if online is False else "network unknown",
    )


def _device(telemetry: dict[str, Any]) -> str:
    return ", ".join(power_and_network(telemetry))


def _label(row: dict[str, Any]) -> str:
    if row.get("satisfied") is None:
        if row["outcome"] in ANSWERED:
            return f"none yet: `locod feedback {row['id']} good` (or bad) teaches the router"
        return "none: only a whole answer can be labelled"
    source = row.get("label_source") or "user"
    return f"{'good' if row['satisfied'] else 'bad'} (from {source})"
