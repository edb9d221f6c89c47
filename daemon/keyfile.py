"""Secrets kept in files: read only when the file is the owner's alone, so a key never sits world-readable."""

from __future__ import annotations

import stat
from pathlib import Path

from locod.errors import ConfigError


def read_key_file(name: str, what: str) -> str:
    """The stripped contents of ``name``; a ConfigError naming ``what`` if it is missing, empty or readable
    by group or others."""
    path = Path(name).expanduser()
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{what} {path} is readable by group or others (mode {stat.S_IMODE(mode):o}); run `chmod 600 {path}`"
        )
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not UTF-8 text") from None
    if not text:  # a blank secret would make "no secret" the secret
        raise ConfigError(f"{what} {path} is empty (or only whitespace)")
    return text
