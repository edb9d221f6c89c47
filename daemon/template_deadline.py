"""A deadline for a GGUF's chat template, which llama-cpp-python renders as Jinja on the turn's thread.

The template comes with the model file, and Jinja's sandbox bounds one ``range()`` to 100,000 items, not
the loops around it: two nested loops take 10^10 steps, hours with the local model's worker (and so every
local turn) held. Compiled Jinja is Python whose code is named ``<template>``: while ``deadline`` is active
this thread traces those frames alone, and the first line one runs past the deadline raises
``TemplateTimeout`` (a ``jinja2.TemplateError``, so that it ends the render like any template error). Time
is all it bounds: what the template allocates (``'x' * 10**9`` in one C call, a long message repeated in a
loop within the deadline) is not.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import jinja2

TEMPLATE_CODE = "<template>"  # the file name Jinja compiles a template from a string under
# What a chat template's render raises besides Jinja's own errors: raise_exception() (ValueError), and
# Python's from the sandbox's objects: range() past 100,000 items (OverflowError), // 0, a macro that
# calls itself (RecursionError), a method given the wrong arguments.
TEMPLATE_FAILURES = (jinja2.TemplateError, ArithmeticError, LookupError, ValueError, TypeError, RecursionError)


class TemplateTimeout(jinja2.TemplateError):
    pass


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Stop any Jinja template rendered on this thread meanwhile once it has run ``seconds``."""
    end = time.monotonic() + seconds

    def line(frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > end:
            raise TemplateTimeout(f"it was still rendering after {seconds:g} s and was stopped")
        return line

    def call(frame: FrameType, event: str, arg: Any) -> Any:
        return line if frame.f_code.co_filename == TEMPLATE_CODE else None

    previous = sys.gettrace()  # a debugger's or coverage's: given back after
    sys.settrace(call)
    try:
        yield
    finally:
        sys.settrace(previous)
