"""Text from clients and models, made safe to show on a terminal.

A session id is whatever a client named it, and an answer is whatever a model (or a hostile endpoint)
wrote: an escape sequence in either would retitle the user's terminal, clear it or recolour what follows.
Control characters (C0, DEL, C1) are shown as escapes (``\\x1b``) instead; newlines and tabs stay in
answers, where they are layout. So are the bidi overrides and isolates (U+202A..U+202E, U+2066..U+2069),
which reorder what follows on the line (a Trojan Source answer reads as other code than it is; a session id
reverses the columns after it), and lone surrogates (undecodable bytes), which a UTF-8 stdout cannot write.
Right-to-left text itself needs none of them and is shown as it is, as ``less`` shows it.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import TextIO

BIDI_OR_UNDECODED = "\u202a-\u202e\u2066-\u2069\ud800-\udfff"  # bidi overrides and isolates; lone surrogates
CONTROL = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{BIDI_OR_UNDECODED}]")  # all but \t and \n
CONTROL_OR_LAYOUT = re.compile(f"[\x00-\x1f\x7f-\x9f\u2028\u2029{BIDI_OR_UNDECODED}]")


def _escape(match: re.Match[str]) -> str:
    return ascii(match.group())[1:-1]  # "\x1b", "\r", "\x9b", "\u202e"


def shown(text: str, *, layout: bool = True) -> str:
    """``text`` with its control characters escaped; ``layout=False`` escapes newlines and tabs too (a
    table cell must stay on its line)."""
    return (CONTROL if layout else CONTROL_OR_LAYOUT).sub(_escape, text)


def columns(text: str) -> int:
    """The terminal columns ``text`` takes: East Asian wide and full-width characters (CJK, most emoji) two,
    combining marks and invisible format characters (a zero-width joiner) none, as wcwidth counts them. A
    table padded by ``len`` ran its columns out of line under a Chinese session name or a Hindi one."""
    return sum(_columns(c) for c in text)


def _columns(char: str) -> int:
    if unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def aligned(cells: Sequence[Sequence[str]]) -> list[str]:
    """Rows of cells as lines of aligned columns, two spaces apart, padded by terminal columns
    (``str.ljust`` counts code points), no line ending in spaces."""
    widths = [max(columns(line[i]) for line in cells) for i in range(len(cells[0]))]
    return ["  ".join(c + " " * (w - columns(c)) for c, w in zip(line, widths)).rstrip() for line in cells]


def for_stream(text: str, stream: TextIO) -> str:
    """What to write of an answer to ``stream``: escaped on a terminal, the text as it is into a pipe or a
    file (it is the user's data: `locod ask ... > file` keeps it byte for byte, and `less -R` or ``cat -v``
    decide how to show it). What locod says about a turn (notices, errors) is escaped wherever it goes, as
    ``shown``: it quotes endpoints and files, and a log file of stderr is read on a terminal too."""
    isatty = getattr(stream, "isatty", None)
    return shown(text) if isatty is not None and isatty() else text
