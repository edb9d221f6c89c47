"""What docs/configuration.md says against the schema it documents: users copy key names, defaults and
variables from it, so a key added, renamed or removed in daemon/config.py must show there too."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from locod.daemon import config as config_module
from locod.daemon.config import Config, load_config, parsed_override

REPO = Path(__file__).resolve().parent.parent
DOC = (REPO / "docs" / "configuration.md").read_text()
SECTIONS = [(f.name, getattr(Config(), f.name)) for f in dataclasses.fields(Config) if f.name != "source"]  # defaults
ENTRIES = {"local": config_module.LocalModelConfig, "cloud": config_module.CloudModelConfig}  # [[X.models]]
TABLE_ROW = re.compile(r"^\| `([a-z_]+)`(?:, `([a-z_]+)`)? \| ([^|]+) \|", re.M)


def section_text(name: str) -> str:
    """The part of the doc under ``### `[name]` ``, up to the next section."""
    start = DOC.index(f"### `[{name}]`")
    end = DOC.find("\n### ", start + 1)
    return DOC[start : end if end > 0 else len(DOC)]


def keys_of(cls: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


@pytest.mark.parametrize(("section", "defaults"), SECTIONS, ids=[name for name, _ in SECTIONS])
def test_every_key_of_the_schema_is_documented_in_its_section(section: str, defaults: Any) -> None:
    text = section_text(section)
    missing = [k for k in keys_of(defaults) if k != "models" and f"`{k}`" not in text]
    if section in ENTRIES:
        assert f"`[[{section}.models]]`" in text
        missing += [f"models.{k}" for k in keys_of(ENTRIES[section]) if f"`{k}`" not in text]
    assert not missing, f"[{section}] keys not in docs/configuration.md: {missing}"
    retired = [k for k in getattr(defaults, "retired_keys", {}) if f"`{k}`" in text]
    assert not retired, f"docs/configuration.md still offers [{section}] keys locod removed: {retired}"


@pytest.mark.parametrize(("section", "defaults"), SECTIONS, ids=[name for name, _ in SECTIONS])
def test_a_key_table_lists_only_keys_the_schema_has_with_their_defaults(section: str, defaults: Any) -> None:
    """A table's default column holds the default as written in TOML (`""`, `[]`, `auto`, 64, true); a cell
    in words ("first listed") is not compared."""
    for *names, cell in TABLE_ROW.findall(section_text(section)):
        for name, written in zip([n for n in names if n], cell.split(", ")):
            assert hasattr(defaults, name), f"docs/configuration.md lists {section}.{name}, which the schema lacks"
            value = written.split(" (")[0].strip().strip("`")
            if value in ('""', "[]"):
                value = ""
            elif value[:1].isupper() or " " in value:  # in words
                continue
            shown = parsed_override(f"{section}.{name}", value, "docs/configuration.md")
            assert shown == getattr(defaults, name), f"{section}.{name}: the doc's default is {written!r}"


def test_every_environment_variable_is_in_the_table() -> None:
    rows = dict(re.findall(r"^\| `(LOCOD_[A-Z_]+)` \| ([^|]+) \|", DOC, re.M))
    for variable, key in config_module.ENV_OVERRIDES.items():
        assert rows.get(variable) == f"`{key}`", f"{variable} -> {key} is not in docs/configuration.md's table"
    read_elsewhere = set(config_module.OTHER_VARIABLES)
    assert set(rows) == {*config_module.ENV_OVERRIDES, *read_elsewhere}
    for variable in config_module.TOOLING_VARIABLES:
        assert f"`{variable}`" in DOC


def test_every_locod_variable_the_code_names_is_documented() -> None:
    """Read anywhere (the daemon, the client, the scripts, the units, the test fixtures): a user sees it there."""
    sources = [*REPO.glob("api/*.py"), *REPO.glob("daemon/*.py"), *REPO.glob("scripts/*"), *REPO.glob("systemd/**/*")]
    sources.append(REPO / "tests" / "conftest.py")
    named = {v for path in sources if path.is_file() for v in re.findall(r"\bLOCOD_[A-Z_]*[A-Z]\b", path.read_text())}
    assert named and not [v for v in sorted(named) if f"`{v}`" not in DOC]


def test_list_values_given_as_text_split_as_documented() -> None:
    """docs/configuration.md's examples: paths split on ':', origins (which hold colons) on commas."""
    config = load_config(
        env={},
        overrides={
            "paths.allow_dirs": "/srv/docs:/srv/photos",
            "http.cors_origins": "http://localhost:3000,http://localhost:5173",
        },
    )
    assert config.paths.allow_dirs == ["/srv/docs", "/srv/photos"]
    assert config.http.cors_origins == ["http://localhost:3000", "http://localhost:5173"]
