"""A turn's task category: one definition for the daemon, the predictor, the policy's observation and the
replay scripts (the order of ``TASKS`` is part of the observation layout and of MESS+'s features).

This runs on the per-turn path, so it is plain regular-expression work measured in microseconds.
"""

from __future__ import annotations

import re

# The first rule that matches names the task; TMO's categories plus the ones a laptop assistant sees most.
TASK_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "code",
        re.compile(r"```|\b(def|class|function|python|javascript|rust|bug|compile|stack trace|regex|sql)\b", re.I),
    ),
    (
        "math",
        re.compile(r"\d\s*[-+*/^=]\s*\d|\b(sum|product|solve|equation|integral|percent|how many|calculate)\b", re.I),
    ),
    ("rewrite", re.compile(r"\b(rewrite|rephrase|paraphrase|translate|summari[sz]e|shorten|proofread|edit)\b", re.I)),
    ("recommend", re.compile(r"\b(recommend|suggest|which should|best way|ideas? for)\b", re.I)),
    # a question ends in ?, or in Chinese and Japanese its full-width ？, in Arabic and Persian ؟
    ("query", re.compile(r"^\s*(who|what|when|where|which|why|how|is|are|does|did|can)\b|[?\uff1f\u061f]\s*$", re.I)),
)
TASKS = ("chat", *(name for name, _ in TASK_RULES))


def task_of(prompt: str) -> str:
    for name, pattern in TASK_RULES:
        if pattern.search(prompt):
            return name
    return "chat"
