"""Secrets: the doors' own keys (the HTTP API's, the tcp endpoint's) and each cloud model's API key (its
environment variable, else its key file) are read here alone, at start and at each reload. A key file is read
only when it is the owner's alone, so a key never sits world-readable, and only when it is a regular file of a
key's size (``regular_file``): a FIFO must not hold the serving loop.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from locod.daemon.config import CloudModelConfig, Config
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


def read_api_key(model: CloudModelConfig, source: str, env: dict[str, str] | None = None) -> str | None:
    """The key from the model's env variable, else its key file (refused if group/world can read it, in an
    error that names the config file ``source`` that points at it); None for a model that takes none."""
    env = dict(os.environ) if env is None else env
    if not model.needs_key:
        return None
    if env.get(model.api_key_env):
        key = env[model.api_key_env].strip()
    elif model.api_key_file:
        key = read_key_file(model.api_key_file, f"{source}: cloud model {model.name!r}: api_key_file")
    else:
        return None
    return _header_safe(key, model, source, env)


def _header_safe(key: str, model: CloudModelConfig, source: str, env: dict[str, str]) -> str:
    """The key, if an ``Authorization`` header can carry it: printable ASCII without spaces. Anything else
    (two keys on two lines, a character pasted in) failed every call as if the endpoint were unreachable,
    and the HTTP library's error quoted the header, key and all. The ConfigError names the character only."""
    for position, char in enumerate(key):
        if not "!" <= char <= "~":
            raise ConfigError(
                f"{source}: cloud model {model.name!r}: the API key from {key_source(model, env)} holds {char!a} at "
                f"character {position + 1}; a key must be printable ASCII without spaces (one key, one line)"
            )
    return key


def key_source(model: CloudModelConfig, env: dict[str, str] | None = None) -> str:
    """Where ``read_api_key`` takes the model's key from, in words (never the key)."""
    env = dict(os.environ) if env is None else env
    if not model.needs_key:
        return "nowhere: needs_key = false"
    if env.get(model.api_key_env):
        return f"${model.api_key_env}"
    if model.api_key_file:
        return f"api_key_file {Path(model.api_key_file).expanduser()}"
    return f"nowhere: neither ${model.api_key_env} nor api_key_file is set"
