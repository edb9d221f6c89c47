"""A schema's ``pattern`` as a pattern over the JSON text of its string, for llama.cpp's converter.

A pattern speaks of the string's value; the grammar the converter makes of it writes that value's JSON
text verbatim, so a pattern's ``.``, a character class, or a ``"``, ``\\n`` or ``\\\\`` in it let the model
write a raw quote, backslash or control character into the string, and the answer is no JSON at all. Here
each character the pattern matches is written as JSON writes it: a character JSON takes raw as one class,
the others as their escapes (``\\"``, ``\\\\``, ``\\n``, ``\\u001f``). The rest of the pattern (groups,
``|``, quantifiers, anchors) is passed on as it is.
"""

from __future__ import annotations

UNICODE_END = 0x10FFFF
FORBIDDEN_RAW = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C)]  # what a JSON string never holds raw
SHORT_ESCAPES = {0x22: '"', 0x5C: "\\", 0x08: "b", 0x09: "t", 0x0A: "n", 0x0C: "f", 0x0D: "r"}
DIGITS = [(0x30, 0x39)]
WORD = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
SPACE = [(0x09, 0x0D), (0x20, 0x20)]
SHORTHANDS = {"d": DIGITS, "w": WORD, "s": SPACE}
CHAR_ESCAPES = {"t": 0x09, "n": 0x0A, "v": 0x0B, "f": 0x0C, "r": 0x0D, "0": 0x00}
HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}
DOT = [(0x00, 0x09), (0x0B, 0x0C), (0x0E, UNICODE_END)]  # the converter's: any character but \n and \r
QUANTIFIERS = "*+?"
SYNTAX = "()|"
PLAIN = frozenset(" _,:;!@#%&=<>~'/`")  # punctuation neither the converter nor GBNF reads as syntax

Ranges = list[tuple[int, int]]


def _complement(ranges: Ranges) -> Ranges:
    out: Ranges = []
    at = 0
    for low, high in sorted(ranges):
        if low > at:
            out.append((at, low - 1))
        at = max(at, high + 1)
    if at <= UNICODE_END:
        out.append((at, UNICODE_END))
    return out


def _intersect(ranges: Ranges, other: Ranges) -> Ranges:
    return [
        (max(low, o_low), min(high, o_high))
        for low, high in ranges
        for o_low, o_high in other
        if max(low, o_low) <= min(high, o_high)
    ]


def _escape(point: int) -> str:
    """A code point as a GBNF class writes it (any character, so none is read as syntax)."""
    if point <= 0xFF:
        return f"\\x{point:02X}"
    return f"\\u{point:04X}" if point <= 0xFFFF else f"\\U{point:08X}"


def _gbnf_class(ranges: Ranges) -> str:
    body = "".join(_escape(low) if low == high else f"{_escape(low)}-{_escape(high)}" for low, high in ranges)
    return f"[{body}]"


def _json_text(ranges: Ranges, original: str) -> str:
    """A pattern matching the JSON text of any one character of ``ranges``: those JSON takes raw as one
    class, the others as their escapes. A set that matches nothing keeps the pattern's own class, which the
    grammar's check refuses by name."""
    raw = _intersect(ranges, _complement(FORBIDDEN_RAW))
    escaped = sorted(p for low, high in _intersect(ranges, FORBIDDEN_RAW) for p in range(low, high + 1))
    if not raw and not escaped:
        return original
    backslash = _gbnf_class([(0x5C, 0x5C)])
    choices = [_gbnf_class(raw)] if raw else []
    short = [SHORT_ESCAPES[p] for p in escaped if p in SHORT_ESCAPES]
    if short:
        choices.append(backslash + _gbnf_class([(ord(c), ord(c)) for c in short]))
    for high_digit in (0, 1):  # a control character, as \u00XX
        lows = [p & 0xF for p in escaped if p >> 4 == high_digit]
        if lows:
            digits = _gbnf_class([(ord(f"{d:x}"), ord(f"{d:x}")) for d in lows])
            choices.append(f"{backslash}u00{high_digit}{digits}")
    return choices[0] if len(choices) == 1 else "(" + "|".join(choices) + ")"


def _read_escape(pattern: str, at: int) -> tuple[Ranges | None, int]:
    """The characters the escape at ``pattern[at]`` (a backslash) matches, and where it ends; None: an
    escape that is not a character (``\\b``, a back-reference), passed on as it is."""
    letter = pattern[at + 1] if at + 1 < len(pattern) else "\\"
    if letter.lower() in SHORTHANDS:
        ranges = SHORTHANDS[letter.lower()]
        return (_complement(ranges) if letter.isupper() else ranges), at + 2
    if letter in CHAR_ESCAPES:
        return [(CHAR_ESCAPES[letter], CHAR_ESCAPES[letter])], at + 2
    if letter in HEX_ESCAPES:
        digits = pattern[at + 2 : at + 2 + HEX_ESCAPES[letter]]
        if len(digits) == HEX_ESCAPES[letter] and all(c in "0123456789abcdefABCDEF" for c in digits):
            point = min(int(digits, 16), UNICODE_END)
            return [(point, point)], at + 2 + len(digits)
    if letter.isalnum():
        return None, at + 2
    return [(ord(letter), ord(letter))], at + 2  # an escaped punctuation character is itself


def _read_class(pattern: str, at: int) -> tuple[Ranges, int]:
    """The characters of the class opening at ``pattern[at]``, and where it ends (past its ``]``)."""
    i = at + 1
    negated = pattern.startswith("^", i)
    i += negated
    ranges: Ranges = []
    first = True
    while i < len(pattern) and (pattern[i] != "]" or first):
        first = False
        if pattern[i] == "\\":
            chars, i = _read_escape(pattern, i)
            chars = chars or []
        else:
            chars, i = [(ord(pattern[i]), ord(pattern[i]))], i + 1
        is_range = len(chars) == 1 and chars[0][0] == chars[0][1] and pattern.startswith("-", i)
        if is_range and i + 1 < len(pattern) and pattern[i + 1] != "]":
            if pattern[i + 1] == "\\":
                end, i = _read_escape(pattern, i + 1)
            else:
                end, i = [(ord(pattern[i + 1]), ord(pattern[i + 1]))], i + 2
            if end and len(end) == 1 and end[0][0] == end[0][1]:
                chars = [(chars[0][0], end[0][0])]
            else:
                chars = chars + [(0x2D, 0x2D)] + (end or [])
        ranges.extend(chars)
    return (_complement(ranges) if negated else ranges), i + 1


def json_text_pattern(pattern: str) -> str:
    """``pattern`` (``^...$``, as the converter takes it) matching the JSON text of the strings it matches."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if (c == "^" and i == 0) or (c == "$" and i == len(pattern) - 1) or c in SYNTAX + QUANTIFIERS:
            out.append(c)
            i += 1
        elif c == "{":  # a quantifier, passed on whole
            end = pattern.find("}", i)
            end = len(pattern) - 1 if end < 0 else end
            out.append(pattern[i : end + 1])
            i = end + 1
        elif c == "[":
            start = i
            ranges, i = _read_class(pattern, i)
            out.append(_json_text(ranges, pattern[start:i]))
        elif c == ".":
            out.append(_json_text(DOT, c))
            i += 1
        elif c == "\\":
            start = i
            chars, i = _read_escape(pattern, i)
            out.append(pattern[start:i] if chars is None else _json_text(chars, pattern[start:i]))
        else:
            out.append(c if c.isalnum() or c in PLAIN else _json_text([(ord(c), ord(c))], c))
            i += 1
    return "".join(out)
