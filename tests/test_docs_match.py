"""The docs against the code in the directions tests/test_docs.py and tests/test_docs_protocol.py leave open:
those check that what a doc names exists; these, that what the code offers is in the docs. Every config key
with a default says it (the default shows the key's type), every ``LOCOD_*`` variable a doc names is read,
every code and status the HTTP door answers is in docs/http.md, and README's table of commands lists each
command with exactly the arguments and flags its parser takes."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from locod import cli, protocol
from locod.policy import train_cli

from .test_docs import (
    DOC,
    DOCS,
    ENTRIES,
    HTTP_ERRORS,
    HTTP_SOURCES,
    SECTIONS,
    TABLE_ROW,
    VARIABLE,
    http_codes_in_source,
    section_text,
    variables_in_code,
)

REPO = Path(__file__).resolve().parent.parent

# -- docs/configuration.md: a default for every key ---------------------------------------------------

# `key` (what the prose says of it), or `a`, `b` (...), which says it of both
PROSE_KEYS = re.compile(r"((?:`[a-z_]+`, )*`[a-z_]+`) \(([^()]*)")
# How a parenthesis gives a default: "default 0", "0.15 and 0.60", "`/sys`", "true: ...", "empty: ...", "none"
GIVES_DEFAULT = re.compile(r"\bdefault\b|^(?:-?\d|`|true\b|false\b|empty\b|none\b)")


def documented_defaults(text: str) -> set[str]:
    """The keys a section's text gives a default for: in a key table's row, or in the parenthesis after the
    key in prose (`max_count` (8; ...), `api_key_file` (none by default; ...))."""
    found = {name for *names, _ in TABLE_ROW.findall(text) for name in names if name}
    prose = " ".join(line for line in text.splitlines() if not line.startswith("|"))
    for keys, said in PROSE_KEYS.findall(" ".join(prose.split())):
        if GIVES_DEFAULT.search(said):
            found |= set(re.findall(r"`([a-z_]+)`", keys))
    return found


@pytest.mark.parametrize(("section", "defaults"), SECTIONS, ids=[name for name, _ in SECTIONS])
def test_every_key_with_a_default_has_it_documented(section: str, defaults: Any) -> None:
    """A `[[X.models]]` entry's keys without a default (`name`, `path`, `base_url`, `model`) are the ones
    each entry must give: the doc says so, with no default to show."""
    text = section_text(section)
    entry_text = text.partition(f"`[[{section}.models]]`")[2]
    keys = [f.name for f in dataclasses.fields(defaults) if f.name != "models"]
    missing = [k for k in keys if k not in documented_defaults(text)]
    if section in ENTRIES:
        given = documented_defaults(entry_text)
        optional = [f for f in dataclasses.fields(ENTRIES[section]) if f.default is not dataclasses.MISSING]
        missing += [f"models.{f.name}" for f in optional if f.name not in given]
    assert not missing, f"docs/configuration.md gives no default for these [{section}] keys: {missing}"


def test_the_default_scan_tells_a_default_from_a_description() -> None:
    assert documented_defaults("`max_count` (8; a refusal names the key), `path` (absolute, or relative)") == {
        "max_count"
    }
    assert documented_defaults("`a`, `b` (US dollars; default 0.15 and 0.60)") == {"a", "b"}


def test_every_key_with_a_fixed_set_of_values_is_documented_with_them() -> None:
    """Each of its values in its section, and the key among those "A key with a fixed set of values (...)"
    names, which take them in any case."""
    doc = " ".join(DOC.split())
    any_case = re.search(r"A key with a fixed set of values \(([^)]*)\)", doc)
    assert any_case
    owners = [(s, d) for s, d in SECTIONS] + [(f"{s} models", cls) for s, cls in ENTRIES.items()]
    for owner, schema in owners:
        section = owner.split()[0]
        for key in (f for f in dataclasses.fields(schema) if f.metadata.get("choices")):
            unsaid = [c for c in key.metadata["choices"] if f"`{c}`" not in section_text(section)]
            assert not unsaid, f"docs/configuration.md's [{section}] does not give {key.name}'s values {unsaid}"
            named = f"`{section}.{key.name}`" if owner == section else f"`{key.name}`"
            assert named in any_case.group(1), f"{named} is not among the keys taking their values in any case"


# -- LOCOD_* variables ---------------------------------------------------------------------------------


def test_every_locod_variable_a_doc_names_is_read_by_the_code() -> None:
    """The reverse of test_docs.py's check: a variable removed from the code leaves no doc offering it (the
    misspelt `LOCOD_SLAA` the daemon warns of is named in its code too)."""
    read = variables_in_code()
    named = {v for text in DOCS.values() for v in VARIABLE.findall(text)}
    assert "LOCOD_SECRET" in named and "LOCOD_SECRET" in read  # the scan reads the client's code too
    assert sorted(named - read) == []


# -- docs/http.md: every code and status the HTTP door answers -----------------------------------------


def test_every_code_the_http_door_gives_is_in_http_md_s_errors() -> None:
    codes = http_codes_in_source()
    assert {"unauthorized", "client_gone", "invalid_json", "not_found"} <= codes  # the scan finds them
    assert sorted(c for c in codes if f"`{c}`" not in HTTP_ERRORS) == []


def http_statuses_in_source() -> set[int]:
    """The statuses the HTTP door answers: an ``HttpError``'s, one ``status_of`` maps a daemon's error frame
    to, the framework's own (the ``exception_handlers`` it answers in OpenAI's shape), and the connection
    layer's (h11's 400, the connection limit's 503)."""
    found: set[int] = set()
    for path in HTTP_SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            values: list[ast.expr] = []
            if isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] == "HttpError":
                values += node.args[:1]
            elif isinstance(node, ast.Call):
                values += [k.value for k in node.keywords if k.arg in ("status_code", "exception_handlers")]
            elif isinstance(node, ast.FunctionDef) and node.name == "status_of":
                values += [r.value for r in ast.walk(node) if isinstance(r, ast.Return) and r.value is not None]
            for value in values:
                keys = value.keys if isinstance(value, ast.Dict) else [value]  # the handlers' statuses
                constants = [c for key in keys if key is not None for c in ast.walk(key)]
                found |= {c.value for c in constants if isinstance(c, ast.Constant) and type(c.value) is int}
    return {status for status in found if 400 <= status < 600}


def test_http_md_s_status_table_lists_every_status_the_door_answers() -> None:
    statuses = http_statuses_in_source()
    assert {401, 405, 413, 415, 429, 502, 503} <= statuses  # the scan finds each way of giving one
    table = {int(s) for s in re.findall(r"^\| (\d{3}) \|", HTTP_ERRORS, re.M)}
    assert table == statuses


# -- docs/protocol.md: every field a request may carry ------------------------------------------------

PROTOCOL = (REPO / "docs" / "protocol.md").read_text()


def test_every_field_of_a_request_is_in_protocol_md() -> None:
    """A chat's fields in the Requests table (``prompt`` stands beside ``messages``, which it becomes), and
    feedback's and the decisions query's in their rows of the Other ops table."""
    requests = PROTOCOL[PROTOCOL.index("\n## Requests") : PROTOCOL.index("### Other ops")]
    rows = set(re.findall(r"^\| `([a-z_]+)` \|", requests, re.M))
    chat = {f.name for f in dataclasses.fields(protocol.ChatRequest)}
    assert sorted(chat - rows) == [], "docs/protocol.md's Requests table leaves out chat fields"
    for op, schema in (("feedback", protocol.FeedbackRequest), ("decisions", protocol.RecordQuery)):
        row = re.search(rf"^\| `{op}` \| ([^|]*) \|", PROTOCOL, re.M)
        assert row, f"docs/protocol.md's Other ops table has no row for {op}"
        fields = {f.name for f in dataclasses.fields(schema)} - {"id", "secret"}
        assert sorted(f for f in fields if f"`{f}`" not in row.group(1)) == [], f"the {op} row leaves out fields"


# -- README's table of commands -------------------------------------------------------------------------

README = (REPO / "README.md").read_text()
COMMAND_ROW = re.compile(r"^\| (\(any\)|`[^`]+`) \| (.*) \|$", re.M)
FLAG = re.compile(r"(?<![\w-])--?[a-zA-Z][\w-]*")


def readme_commands() -> dict[str, tuple[list[str], set[str]]]:
    """README's "Commands and their flags": each command (`models pull`; "" for the row of every command),
    with the arguments its cell shows (`[ID]`, `good|bad`) and the flags its row lists."""
    start = README.index("### Commands and their flags")
    table = README[start : README.index("\n## ", start)]
    rows = {}
    for cell, flags in COMMAND_ROW.findall(table):
        words = [] if cell == "(any)" else cell.strip("`").replace("\\|", "|").split()
        command = [w for w in words if re.fullmatch(r"[a-z]+", w)]
        arguments = words[len(command) :]
        assert words[: len(command)] == command, f"README: `{cell}`: the command first, then its arguments"
        rows[" ".join(command)] = (arguments, set(FLAG.findall(flags)))
    return rows


def parser_commands() -> dict[str, tuple[list[str], set[str]]]:
    """Each command `locod` parses, with its positional arguments as a usage line writes them (`[ID]` when
    optional, `[PROMPT...]` when any number of words) and its flags; "" for the flags every command takes,
    given before it."""
    global_flags = {o for a in cli._AFTER._actions for o in a.option_strings}
    top = cli._parser()
    found: dict[str, tuple[list[str], set[str]]] = {
        "": ([], {o for a in top._actions for o in a.option_strings} - {"-h", "--help"})
    }

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if subparsers:
            for name, sub in subparsers[0].choices.items():
                walk(sub, [*path, name])
            return
        if parser.get_default("func") is cli.cmd_policy_train:  # its options are the trainer's own
            parser = train_cli.parser(Path("policy.onnx"))
        flags = {o for a in parser._actions for o in a.option_strings} - global_flags - {"-h", "--help"}
        arguments = []
        for action in (a for a in parser._actions if not a.option_strings):
            shown = "|".join(action.choices) if action.choices else str(action.metavar or action.dest).upper()
            arguments.append(f"[{shown}]" if action.nargs == "?" else f"[{shown}...]" if action.nargs == "*" else shown)
        found[" ".join(path)] = (arguments, flags)

    walk(top, [])
    return found


def test_readme_lists_every_command_with_its_arguments_and_flags() -> None:
    documented, parsed = readme_commands(), parser_commands()
    assert sorted(documented) == sorted(parsed), "README's table of commands must have a row for each command"
    for command, (arguments, flags) in parsed.items():
        shown_arguments, shown_flags = documented[command]
        assert shown_flags == flags, f"README: `{command}` takes {sorted(flags)}"
        assert [placeholder(a) for a in shown_arguments] == [placeholder(a) for a in arguments], (
            f"README: `{command}` takes the arguments {arguments}"
        )


def placeholder(argument: str) -> str:
    """An argument as its shape: a placeholder's name is the writer's (`ID`, `DECISION`), `[...]` and a
    choice (`good|bad`) are not."""
    return re.sub(r"[A-Z][A-Z_.]*", "X", argument)
