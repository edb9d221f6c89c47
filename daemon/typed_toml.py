"""TOML tables read into typed dataclasses: the checks behind every "file: key expects X, got Y".

A schema is a frozen dataclass whose fields say each key's type, default and (through ``in_range`` or
``one_of``) its bounds. ``build_table`` checks a parsed table against one, key by key, so an unknown key, a
wrong type or an out-of-range value is refused naming the file and the key; ``set_text`` does the same for
a value given as text (an environment variable, a ``--set`` override) and names where that came from.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from locod.daemon.regular_file import read_regular
from locod.errors import ConfigError
from locod.words import closest, quoted

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# A schema field that no file or override sets: Config.source, where the values came from.
NOT_A_KEY = "source"


def in_range(lo: float | None = None, hi: float | None = None) -> dict[str, Any]:
    """A field's bounds, as ``field(metadata=...)``: a value outside them is refused by name."""
    return {"min": lo, "max": hi}


def one_of(*options: str) -> dict[str, Any]:
    """A field's allowed values, as ``field(metadata=...)``, matched in any case and kept as spelt here."""
    return {"choices": options}


def separated_by(separator: str) -> dict[str, Any]:
    """A list field's separator in a value given as text (``--set``, the environment), as ``field(metadata=...)``:
    a list of URLs cannot be split on ``os.pathsep``, which a list of paths is (as ``$PATH`` is)."""
    return {"separator": separator}


# What tomllib's "Invalid value" most often means in a config: text written as a shell would take it
# (mode = auto, path = ~/models/x.gguf) or a boolean as Python writes it (True). The line is not quoted back:
# it may hold a key pasted in by mistake.
UNQUOTED = '; text, paths included, needs quotes (mode = "auto"), and a boolean is true or false'


def read_toml(path: Path, limit: int) -> dict[str, Any]:
    """A TOML file's table, read whole only when under ``limit`` bytes; any failure is a one-line
    ConfigError naming the file, except FileNotFoundError, which each caller answers its own way."""
    try:
        return tomllib.loads(read_regular(path, limit).decode("utf-8"))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except ValueError as exc:  # TOMLDecodeError, or an integer of over 4,300 digits
        said = _one_line(exc)
        hint = UNQUOTED if said.startswith("Invalid value") else ""
        raise ConfigError(f"{path}: not valid TOML: {said}{hint}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML: nested too deeply") from None


def build_table(cls: Any, table: Any, source: str, where: str) -> Any:
    """Check a TOML table against the schema dataclass ``cls`` (keys, types, ranges) and build it."""
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [{where.rstrip('.') or 'top level'}] must be a table, got {type(table).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls) if f.name != NOT_A_KEY}
    for key in table:
        if key not in names:
            raise _unknown_key(cls, source, where + key)
    values: dict[str, Any] = {}
    for name, fld in names.items():
        if name not in table:
            if fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{source}: {where}{name} is required")
            continue
        values[name] = _value(hints[name], table[name], fld.metadata, source, where + name)
    return cls(**values)


def _value(hint: Any, raw: Any, meta: Mapping[str, Any], source: str, key: str) -> Any:
    """``raw`` checked against the type ``hint`` and the field's bounds or choices, and converted (an
    integer where a number is expected, a choice in the schema's spelling, "" for an optional: None)."""
    base = _strip_optional(hint)
    if base is not hint and raw == "":
        return None
    if dataclasses.is_dataclass(base):
        return build_table(base, raw, source, key + ".")
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        if not isinstance(raw, list):
            raise ConfigError(f"{source}: {key} expects {_type_name(base)}, got {type(raw).__name__}")
        return [_value(item, element, {}, source, f"{key}[{i}]") for i, element in enumerate(raw)]
    given = raw  # as written: `sla = 3` is reported as 3, not 3.0
    ok = isinstance(raw, base) and not (base is int and isinstance(raw, bool))
    if base is float and isinstance(raw, int) and not isinstance(raw, bool):
        raw, ok = float(raw), True
    if not ok:
        raise ConfigError(f"{source}: {key} expects {_type_name(hint)}, got {type(raw).__name__} {quoted(raw)}")
    if base is float and not math.isfinite(raw):
        raise ConfigError(f"{source}: {key} must be a finite number, got {raw!r}")
    if base is str and "\0" in raw:  # no path, URL or name holds one: os.open raised ValueError, an internal error
        raise ConfigError(f"{source}: {key} must not hold a NUL character (\\0); the value is not shown")
    lo, hi = meta.get("min"), meta.get("max")
    if (lo is not None and raw < lo) or (hi is not None and raw > hi):
        bounds = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise ConfigError(f"{source}: {key} must be {bounds}, got {given!r}")
    choices = meta.get("choices")
    if choices:  # in any case (LOCOD_LOG_LEVEL=debug), kept as the schema spells it
        spelt = {choice.lower(): choice for choice in choices}.get(raw.lower())
        if spelt is None:
            raise ConfigError(f"{source}: {key} must be one of {', '.join(choices)}, got {quoted(raw)}")
        return spelt
    return raw


def set_text(schema: Any, table: dict[str, Any], dotted: str, text: str, origin: str) -> None:
    """Put an override given as text into the raw table, converted by the type ``schema`` gives that key and
    checked against its range or choices here, so that an error names ``origin``, not the file."""
    *sections, key = dotted.split(".")
    cls = schema
    node = table
    for section in sections:
        hints = typing.get_type_hints(cls)
        if section not in hints or not dataclasses.is_dataclass(hints[section]):
            raise ConfigError(f"{origin}: unknown section {section!r} ({_known(cls, section)})")
        cls = hints[section]
        node = node.setdefault(section, {})
        if not isinstance(node, dict):  # the file's `routing = 5`: build_table refuses it, naming the file
            return
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != NOT_A_KEY}
    if key not in fields:
        raise _unknown_key(cls, origin, dotted)
    meta = fields[key].metadata
    parsed = _parse_text(hints[key], text, origin, dotted, meta.get("separator", os.pathsep))
    node[key] = _value(hints[key], parsed, meta, origin, dotted)


def _parse_text(hint: Any, text: str, origin: str, key: str, separator: str) -> Any:
    """The value an environment variable or override's text stands for; a list is split on ``separator``."""
    base = _strip_optional(hint)
    try:
        if base is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if base is int:
            return int(text)
        if base is float:
            return float(text)
        if typing.get_origin(base) is list:
            return [part.strip() for part in text.split(separator) if part.strip()]
    except ValueError:
        raise ConfigError(f"{origin}: {key} expects {_type_name(hint)}, got {quoted(text)}") from None
    return text


def _unknown_key(cls: Any, source: str, dotted: str) -> ConfigError:
    """A key the schema does not have; one an upgrade removed (the schema's ``retired_keys``: a config file
    outlives the version it was written for) says what became of it, not only that it is unknown."""
    retired: Mapping[str, str] = getattr(cls, "retired_keys", {})
    name = dotted.rpartition(".")[2]
    if name in retired:
        return ConfigError(f"{source}: key {dotted!r} was removed from locod: {retired[name]}")
    return ConfigError(f"{source}: unknown key {dotted!r} ({_known(cls, name)})")


def _known(cls: Any, name: str) -> str:
    """The names a file or an override may use at this level, the one ``name`` misspells first."""
    names = sorted(f.name for f in dataclasses.fields(cls) if f.name != NOT_A_KEY)
    meant = closest(name, names)
    return f"{f'did you mean {meant!r}? ' if meant else ''}known here: {', '.join(names)}"


def _strip_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0]
    return hint


def _type_name(hint: Any) -> str:
    base = _strip_optional(hint)
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        plural = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}
        return f"a list of {'tables' if dataclasses.is_dataclass(item) else plural.get(item, str(item))}"
    if dataclasses.is_dataclass(base):
        return "a table"
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    return names.get(base, str(base))


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())
