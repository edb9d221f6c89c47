"""Counts and money in words, as the CLI, the report and decision reasons show them: ``1 turn``, ``$0.05``."""

from __future__ import annotations

import math


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
