"""Counts, money and quoted values in words, as the CLI, the report, decision reasons and refusals show them:
``1 turn``, ``$0.05``, ``'a long na'... (9,000 characters)``; and the other way, the name a mistyped word
meant and a number a command line gives."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable
from typing import Any


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun``, made plural (``noun + "s"``, or ``plural``) unless ``n`` is 1."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def dollars(usd: float) -> str:
    """``$0.05``, ``$0.0002``, ``$0.000518``: four significant digits, at least two decimals, never ``$1e-05``
    nor ``$0.00`` for a cap or a price of a fraction of a cent (common in tests and for cheap models)."""
    digits = 2 if usd >= 1 or usd <= 0 else 3 - math.floor(math.log10(usd))
    whole, _, fraction = f"{usd:.{digits}f}".partition(".")
    return f"${whole}.{fraction.rstrip('0').ljust(2, '0')}"


def or_na(value: object, pattern: str) -> str:
    """``value`` in ``pattern`` (``"{:.1f} W"``), or ``n/a`` for what was not measured."""
    return "n/a" if value is None else pattern.format(value)


def quoted(value: Any, most: int = 80) -> str:
    """``value`` as an error quotes it: its repr, a long text's first ``most`` characters only. A 100 kB
    variable (a file's content pasted into it) was echoed whole, the one line an error is many screens; a
    1 MB field name sent to the daemon came back in a 1 MB refusal."""
    if isinstance(value, str) and len(value) > most:
        return f"{value[:most]!r}... ({len(value):,} characters)"
    return repr(value)


def listed(names: Iterable[str], most: int = 5) -> str:
    """Names a refusal lists (unknown keys), sorted: the first ``most`` of them, each ``quoted`` in 40
    characters, and how many more, so that a message of 100,000 unknown keys is not sent back whole."""
    ordered = sorted(names)
    shown = ", ".join(quoted(name, 40) for name in ordered[:most])
    more = f", and {len(ordered) - most:,} more" if len(ordered) > most else ""
    return f"[{shown}{more}]"


def closest(word: str, names: Iterable[str]) -> str | None:
    """The one of ``names`` that ``word`` most likely misspells (``defualt`` for ``default``), or None: a
    refusal that only lists every known name leaves the user to spot the one they meant."""
    close = difflib.get_close_matches(word, list(names), n=1, cutoff=0.6)
    return close[0] if close else None


def ascii_number(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """A reader of ``kind`` (int or float) from ASCII alone, for a command line's numbers: Python's own also
    take ``３``, ``١٢`` (12) and ``5_0`` (50), so ``--max-tokens 5_0`` ran with 50 and ``--limit ３`` listed 3
    where ``locod decisions ３`` is no decision at all."""

    def read(text: str) -> Any:
        if not text.isascii() or "_" in text:
            raise ValueError(f"not an ASCII number: {text!r}")
        return kind(text)

    read.__name__ = kind.__name__  # argparse's refusal says "invalid int value", as for int itself
    return read
