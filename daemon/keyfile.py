"""Secrets kept in files: read only when the file is the owner's alone, so a key never sits world-readable,
and only when it is a regular file of a key's size (``regular_file``): a FIFO must not hold the serving loop.
The doors' own keys (the HTTP API's, the tcp endpoint's) are read here alone, at start and at each reload.
"""

from __future__ import annotations

import stat
from pathlib import Path

from locod.daemon.config import Config
from locod.daemon.regular_file import read_regular
from locod.errors import ConfigError

MAX_KEY_BYTES = 64 * 1024  # keys and secrets are tens of bytes; a token file with a certificate chain, a few kB


def read_key_file(name: str, what: str) -> str:
    """The stripped contents of ``name``; a ConfigError naming ``what`` if it is missing, empty, not a
    regular file, over MAX_KEY_BYTES or readable by group or others."""
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
        text = read_regular(path, MAX_KEY_BYTES).decode("utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not UTF-8 text") from None
    if not text:  # a blank secret would make "no secret" the secret
        raise ConfigError(f"{what} {path} is empty (or only whitespace)")
    return text


def http_api_key(config: Config) -> str | None:
    """The HTTP API's bearer key, from http.api_key_file; None when it is unset (loopback only, config.py)."""
    path = config.http.api_key_file
    return read_key_file(path, "http.api_key_file") if path else None


def tcp_secret(config: Config) -> str | None:
    """The tcp endpoint's secret, if it has one (the config's check refused a non-loopback one without)."""
    path = config.daemon.tcp_secret_file
    return read_key_file(path, "daemon.tcp_secret_file") if config.daemon.tcp and path else None
