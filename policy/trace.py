"""Replay traces (docs/routing.md): one JSON object a turn, holding the answers of ``cloud`` and of one
local model, under the name of whichever GGUF answered (scripts/build_trace.py --model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from locod.errors import PolicyError

CLOUD = "cloud"


def read_rows(path: Path) -> list[dict[str, Any]]:
    """A trace's turns; a missing file, an empty one or a line that is not a JSON object is named."""
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
        rows.append(row)
    if not rows:
        raise PolicyError(f"{path}: no turns in the trace (scripts/build_trace.py makes one)", code="trace_invalid")
    return rows


def local_model(rows: list[dict[str, Any]], path: Path) -> str:
    """The name of the trace's one local model, whatever the GGUF that answered was called."""
    names = {name for row in rows for name in row["models"] if name != CLOUD}
    if len(names) != 1:
        found = ", ".join(sorted(names)) or "none"
        raise PolicyError(f"{path}: expected one local model beside '{CLOUD}', found {found}", code="trace_invalid")
    return names.pop()
