"""Review 33: docs/config.example.toml against the schema it exemplifies. A key added to daemon/config.py
must show there too (set, or commented out at its default), and a key it shows must still be one the
schema has, of the type and range the schema takes (tests/test_docs.py holds docs/configuration.md to
the same)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from locod.daemon.config import CloudModelConfig, Config, LocalModelConfig
from locod.daemon.typed_toml import build_table, tomllib

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "config.example.toml"
COMMENTED_KEY = re.compile(r"^# ([a-z_]+ = )", re.M)  # `# tcp = ""`, not a line of prose
# Commented-out lines that show an alternative, which their own comment explains, rather than the default.
ALTERNATIVES = {"local.hub_endpoint", "http.api_key_file", "cloud.models.max_tokens_param", "cloud.models.sampling"}


def keys_of(cls: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_every_key_of_the_schema_is_in_the_example() -> None:
    """Each section's keys, and each model entry's, in the example, set or commented out."""
    table = tomllib.loads(COMMENTED_KEY.sub(r"\1", EXAMPLE.read_text()))
    for section in (f.name for f in dataclasses.fields(Config) if f.name != "source"):
        missing = keys_of(getattr(Config(), section)) - set(table.get(section, {})) - {"models"}
        assert not missing, f"docs/config.example.toml's [{section}] lacks {sorted(missing)}"
    for where, cls in (("local", LocalModelConfig), ("cloud", CloudModelConfig)):
        shown = {key for entry in table[where]["models"] for key in entry}
        assert keys_of(cls) <= shown, f"[[{where}.models]] lacks {sorted(keys_of(cls) - shown)}"


def test_every_key_the_example_shows_is_the_schema_s_at_its_default() -> None:
    """Uncommented, the example is a config the schema takes (keys, types, ranges); a key commented out
    holds its default, so a changed default cannot leave the example saying the old one."""
    text = EXAMPLE.read_text()
    config = build_table(Config, tomllib.loads(COMMENTED_KEY.sub(r"\1", text)), str(EXAMPLE), "")
    commented = set()
    for block in re.split(r"^(?=\[)", text, flags=re.M):
        header = re.match(r"\[+([a-z.]+)\]+", block)
        section = header.group(1) if header else ""
        commented |= {f"{section}.{key}" for key in re.findall(r"^# ([a-z_]+) = ", block, re.M)}
    defaults = {"local.models": LocalModelConfig("x", "x"), "cloud.models": CloudModelConfig("x", "x", "x")}
    for dotted in sorted(commented - ALTERNATIVES):
        section, key = dotted.rsplit(".", 1)
        default = getattr(defaults.get(section) or getattr(Config(), section), key)
        owner = getattr(config, section.split(".")[0])
        values = [getattr(m, key) for m in owner.models] if section.endswith(".models") else [getattr(owner, key)]
        assert default in values, f"config.example.toml shows {dotted} = {values[-1]!r}; its default is {default!r}"
