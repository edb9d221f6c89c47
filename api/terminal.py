"""Text from clients and models, made safe to show on a terminal.

A session id is whatever a client named it, and an answer is whatever a model (or a hostile endpoint)
wrote: an escape sequence in either would retitle the user's terminal, clear it or recolour what follows.
Control characters (C0, DEL, C1) are shown as escapes (``\\x1b``) instead; newlines and tabs stay in
answers, where they are layout.
"""

from __future__ import annotations

import re
from typing import TextIO

CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # all but \t and \n
CONTROL_OR_LAYOUT = re.compile("[\x00-\x1f\x7f-\x9f]")


def _escape(match: re.Match[str]) -> str:
    return repr(match.group())[1:-1]  # "\x1b", "\r", "\x9b"


def shown(text: str, *, layout: bool = True) -> str:
    """``text`` with its control characters escaped; ``layout=False`` escapes newlines and tabs too (a
    table cell must stay on its line)."""
    return (CONTROL if layout else CONTROL_OR_LAYOUT).sub(_escape, text)


def for_stream(text: str, stream: TextIO) -> str:
    """What to write to ``stream``: escaped on a terminal, the text as it is into a pipe or a file."""
    isatty = getattr(stream, "isatty", None)
    return shown(text) if isatty is not None and isatty() else text
