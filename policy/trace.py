"""Replay traces (docs/routing.md): one JSON object a turn, holding the answers of ``cloud`` and of one
local model, under the name of whichever GGUF answered (scripts/build_trace.py --model)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from locod.errors import PolicyError

CLOUD = "cloud"
COSTS = ("latency_s", "usd", "energy_j")  # each answer's: finite and not negative
QUALITY = "quality"  # an answer's reward in [0, 1]: training reads it (the replay reads ``satisfied`` alone)


def read_rows(path: Path, scored: bool = False) -> list[dict[str, Any]]:
    """A trace's turns; a missing file, an empty one, a line that is not a JSON object, or a turn whose fields
    are missing or of other types or values than build_trace.py writes (NaN, a cost below 0, a text where a
    number goes; with ``scored``, an answer without its quality) is named by its line: read as they came, they
    stopped training or a replay with a KeyError or TypeError, or trained a policy on NaN rewards."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{path}: cannot read the trace ({exc})", code="trace_invalid") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PolicyError(f"{path}:{number}: not a trace line ({exc})", code="trace_invalid") from None
        if not isinstance(row, dict) or not isinstance(row.get("models"), dict):
            raise PolicyError(f"{path}:{number}: not a trace turn (no 'models' object)", code="trace_invalid")
        problem = _turn_problem(row, scored)
        if problem:
            raise PolicyError(f"{path}:{number}: not a trace turn ({problem})", code="trace_invalid")
        rows.append(row)
    if not rows:
        raise PolicyError(f"{path}: no turns in the trace (scripts/build_trace.py makes one)", code="trace_invalid")
    return rows


def _turn_problem(row: dict[str, Any], scored: bool) -> str | None:
    """What in a turn (a JSON object with a 'models' object) differs from what build_trace.py writes; None: nothing."""
    for key, kinds in (("dialogue", (str, int)), ("turn", int), ("prompt", str), ("task", str)):
        if not isinstance(row.get(key), kinds) or isinstance(row[key], bool):
            return f"'{key}' is {json.dumps(row.get(key))[:40]}"
    if CLOUD not in row["models"]:
        return f"no '{CLOUD}' answer"
    for name, answer in row["models"].items():
        if not isinstance(answer, dict):
            return f"the answer of '{name}' is no object"
        if answer.get("satisfied") not in (0, 1):
            return f"'{name}' satisfied is {json.dumps(answer.get('satisfied'))[:40]}, not 0 or 1"
        for key in (*COSTS, QUALITY) if scored else COSTS:
            value, most = answer.get(key), 1.0 if key == QUALITY else math.inf
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not _within(value, most):
                span = "from 0 to 1" if key == QUALITY else "of 0 or more"
                return f"'{name}' {key} is {json.dumps(value)[:40]}, not a finite number {span}"
    return None


def _within(value: float, most: float) -> bool:
    return math.isfinite(value) and 0 <= value <= most


def local_model(rows: list[dict[str, Any]], path: Path) -> str:
    """The name of the trace's one local model, whatever the GGUF that answered was called."""
    names = {name for row in rows for name in row["models"] if name != CLOUD}
    if len(names) != 1:
        found = ", ".join(sorted(names)) or "none"
        raise PolicyError(f"{path}: expected one local model beside '{CLOUD}', found {found}", code="trace_invalid")
    return names.pop()
