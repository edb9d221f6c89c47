"""stdlib logging to stderr, shaped for journald when systemd runs us.

Under systemd ($JOURNAL_STREAM is set) journald adds the timestamp and reads the level from a
``<N>`` syslog prefix, so lines carry neither a timestamp of their own nor a level word.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
import weakref
from typing import Any

REPORT_EVERY_S = 60.0  # a Throttle's default interval
SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
# What could end a line or rewrite one in a terminal: C0 controls but the tab, DEL, C1 controls (U+009B is a
# CSI to xterm and the Linux console), Unicode line breaks, bidi overrides and isolates (they reorder the line).
LINE_BREAKING = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


class LineFormatter(logging.Formatter):
    """Messages quote client text (request ids, session and file names): its line breaks and control
    characters are escaped, so a client cannot forge a log line of its own. Tracebacks keep their lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _escaped(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        """A traceback's lines, each escaped: an exception's message may quote what a client sent."""
        return "\n".join(_escaped(line) for line in super().formatException(ei).split("\n"))


def _escaped(text: str) -> str:
    return LINE_BREAKING.sub(lambda m: ascii(m.group())[1:-1], text)


class JournalFormatter(LineFormatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = SYSLOG_PRIORITY.get(record.levelno, 6)
        text = super().format(record).replace("\n", " | ")  # one line per event
        return f"<{priority}>{text}"


class Throttle:
    """At most one line per kind of event and interval into ``logger``: for what can happen on every request
    or turn (a failing policy, a flood of refused connections); a line after a quiet spell says how many it
    stood for. What the interval held back is said when it ends (its latest line, with the count of the
    others): a flood that stopped would otherwise never have its count logged, as it would not at a stop
    within the interval (``flush_throttles``). Turn threads share one, so its counts are kept under a lock:
    a race would log twice or lose a count."""

    def __init__(self, logger: logging.Logger, every_s: float = REPORT_EVERY_S) -> None:
        self.logger = logger
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}
        self._held: dict[str, tuple[int, str, tuple[object, ...]]] = {}  # kind -> its latest line not logged
        self._timers: dict[str, threading.Timer] = {}  # kind -> what says ``_held``'s line when its interval ends
        self._lock = threading.Lock()
        _THROTTLES.add(self)

    def say(self, kind: str, level: int, message: str, *args: object) -> None:
        """Log ``message`` unless this kind was logged within the interval: then it is held back, counted,
        and the interval's latest held line is logged when the interval ends."""
        with self._lock:
            now = time.monotonic()
            since = now - self._last.get(kind, -self.every_s)
            if since < self.every_s:
                self._quiet[kind] = self._quiet.get(kind, 0) + 1
                self._held[kind] = (level, message, args)
                if kind not in self._timers:
                    self._timers[kind] = timer = threading.Timer(self.every_s - since, self._interval_ended)
                    timer.args = (kind, timer)
                    timer.daemon = True  # a stop says what it holds (``flush``) rather than wait for it
                    timer.start()
                return
            self._last[kind] = now
            skipped = self._quiet.pop(kind, 0)
            self._held.pop(kind, None)
            pending = self._timers.pop(kind, None)
        if pending is not None:
            pending.cancel()
        self._log(level, message, args, skipped)

    def flush(self) -> None:
        """Log every line held back now (at a stop: the process ends before the intervals do)."""
        with self._lock:
            kinds = list(self._held)
        for kind in kinds:
            self._interval_ended(kind)

    def _interval_ended(self, kind: str, fired: threading.Timer | None = None) -> None:
        """Log ``kind``'s held line; ``fired``: the timer calling, which says nothing once replaced. One that
        fired as ``say`` logged the line ending its interval found the timer of the next line held, and
        logged that line at once: two lines in an interval under a flood."""
        with self._lock:
            if fired is not None and self._timers.get(kind) is not fired:
                return
            pending = self._timers.pop(kind, None)
            held = self._held.pop(kind, None)
            if held is None:  # logged meanwhile by ``say``, its count with it
                return
            self._last[kind] = time.monotonic()
            skipped = self._quiet.pop(kind) - 1  # the held line is one of them
        if pending is not None:
            pending.cancel()  # a flush's: the timer has not fired yet
        self._log(*held, skipped)

    def _log(self, level: int, message: str, args: tuple[object, ...], skipped: int) -> None:
        self.logger.log(level, message + "%s", *args, f" ({skipped} more since the last such line)" if skipped else "")


_THROTTLES: weakref.WeakSet[Throttle] = weakref.WeakSet()  # one replaced (a reload's) stays while its timer runs


def flush_throttles() -> None:
    """At a stop: what every Throttle holds back is logged, its count with it."""
    for throttle in list(_THROTTLES):
        throttle.flush()


def configure_logging(level: str = "INFO") -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_locod", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler._locod = True  # type: ignore[attr-defined]
        if os.environ.get("JOURNAL_STREAM"):
            handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
        else:
            handler.setFormatter(LineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("httpx", "httpx2", "httpcore", "openai"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
