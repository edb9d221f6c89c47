"""Words of any script, as relevance scoring and the digests of private answers read them.

Latin, Cyrillic, Arabic, Devanagari and the like separate words with spaces or punctuation: a word is a run
of letters, digits and combining marks. Chinese, Japanese and Thai do not: a sentence is one run, so each
of their characters is taken as a word of its own (``characters``, ``split_letters``), and where a
word's meaning needs two, as a search term does, each pair of neighbours (``pairs``), the way search engines
index them.
"""

from __future__ import annotations

import re

# Thai, kana, CJK ideographs (and their extensions): letters of scripts written without spaces
UNSPACED_LETTERS = "\u0e01-\u0e4e\u3041-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
# ... and their punctuation, full- and half-width forms: each a word of an answer's opening too
UNSPACED = f"{UNSPACED_LETTERS}\u0e00-\u0e7f\u3001-\u303f\uff00-\uffef"
# Combining marks, which Python's \\w leaves out: a Hindi word's vowel signs, an accent typed apart
MARKS = (
    "\u0300-\u036f\u0483-\u0489\u0591-\u05c7\u0610-\u061a\u064b-\u065f\u0670\u06d6-\u06ed"
    "\u0900-\u0dff\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f"
)
_RUNS = re.compile(f"([{UNSPACED_LETTERS}]+)|(?:[^\\W_{UNSPACED_LETTERS}]|[{MARKS}])+")


def _each_apart(unspaced: str) -> re.Pattern[str]:
    """Whitespace-separated words, each of the ``unspaced`` characters a word of its own."""
    return re.compile(f"[{unspaced}]|[^\\s{unspaced}]+")


_CHARACTERS = _each_apart(UNSPACED)
_LETTERS = _each_apart(UNSPACED_LETTERS)


def characters(text: str) -> list[str]:
    """``text`` split at whitespace, and a run of an unspaced script into its characters."""
    return _CHARACTERS.findall(text)


def split_letters(text: str) -> list[str]:
    """``text`` split at whitespace, and each letter of an unspaced script apart; punctuation stays with what
    it follows, as between spaces. Text without such letters splits exactly as ``str.split`` does: the
    router's predictor hashes these words (policy/messplus.py), and its prior was fitted on that split."""
    return _LETTERS.findall(text)


def pairs(text: str) -> list[str]:
    """``text``'s words (runs of letters and digits), a run of an unspaced script as its pairs of
    neighbouring characters (one of a single character as it is)."""
    out: list[str] = []
    for match in _RUNS.finditer(text):
        run = match.group()
        out.extend([run[i : i + 2] for i in range(max(1, len(run) - 1))] if match.group(1) else [run])
    return out
