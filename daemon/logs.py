"""stdlib logging to stderr, shaped for journald when systemd runs us.

Under systemd ($JOURNAL_STREAM is set) journald adds the timestamp and reads the level from a
``<N>`` syslog prefix, so lines carry neither a timestamp of their own nor a level word.
"""

from __future__ import annotations

import logging
import os
import sys

SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = SYSLOG_PRIORITY.get(record.levelno, 6)
        text = super().format(record).replace("\n", " | ")  # one line per event
        return f"<{priority}>{text}"


def configure_logging(level: str = "INFO") -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_locod", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler._locod = True  # type: ignore[attr-defined]
        if os.environ.get("JOURNAL_STREAM"):
            handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
        else:
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("httpx", "httpx2", "httpcore", "openai"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
