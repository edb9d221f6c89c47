"""What docs/configuration.md says against the schema it documents: users copy key names, defaults and
variables from it, so a key added, renamed or removed in daemon/config.py must show there too. And what
every doc points at (links, sections, files, tests), and docs/http.md's codes, refusals and metrics against
the HTTP door (docs/protocol.md's and the command lines are tests/test_docs_protocol.py's)."""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from locod.daemon import config as config_module
from locod.daemon import openai_wire
from locod.daemon.config import Config, load_config, parsed_override

from .test_docs_protocol import codes_in_source

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


# The units prose defaults are written in: "20 MiB each", "100 M", "300 kB budget", "2 MB/s".
UNITS = {"MiB": 1 << 20, "M": 10**6, "kB": 1000, "MB/s": 10**6}
PROSE_KEY = re.compile(r"`([a-z_]+)` \(((?:[^()]|\([^()]*\))*)\)")  # `key` (what the prose says of it)


def prose_entries() -> list[tuple[str, Any, str, str]]:
    """(where, schema class or section defaults, key, parenthesis) for keys the doc describes in prose, not in
    a table: [log], [attachments], [telemetry] and the [[X.models]] entries."""
    found = []
    for section, defaults in SECTIONS:
        text = section_text(section)
        entries = text.split(f"`[[{section}.models]]`")
        for part, owner in zip(entries, (defaults, ENTRIES.get(section))):
            keys = {f.name for f in dataclasses.fields(owner)} if owner is not None else set()
            rows = "\n".join(line for line in part.splitlines() if not line.startswith("|"))
            found += [(section, owner, k, said) for k, said in PROSE_KEY.findall(" ".join(rows.split())) if k in keys]
    return found


def test_a_default_and_bound_given_in_prose_are_the_schema_s() -> None:
    """`max_bytes` (20 MiB each), `level` (...; default `INFO`), `probe_interval_s` (30, at most 86400): the
    first value, or the one after "default", in the key's unit (a `_mb` key counts MiB), and an "at most" its
    upper bound; a parenthesis in words says neither."""
    checked = 0
    for section, owner, key, said in prose_entries():
        schema = next(f for f in dataclasses.fields(owner) if f.name == key)
        default, bounds = schema.default, schema.metadata
        given = re.search(r"default `?([^`;:,)]+)", said) or re.match(r"`?([^`;:,]+)", said)
        value, _, unit = (given.group(1).strip() if given else "").partition(" ")
        if unit.startswith("and "):  # `a`, `b` (...; default 0.15 and 0.60): the parenthesis is the last key's
            value, _, unit = unit.removeprefix("and ").partition(" ")
        if re.fullmatch(r"-?[\d.]+", value):
            scale = 1 if key.endswith("_mb") else UNITS.get(unit.split(" ")[0], 1)
            assert float(value) * scale == default, f"{section} {key}: docs/configuration.md says ({said})"
            checked += 1
        elif isinstance(default, str) and (value.isupper() or value.startswith("/")):  # INFO, /sys
            assert value == default.upper() if value.isupper() else default, f"{section} {key}: ({said})"
            checked += 1
        elif value in ("true", "false"):
            assert (value == "true") == default, f"{section} {key}: ({said})"
            checked += 1
        if bound := re.search(r"at most ([\d,]+)", said):
            assert float(bound.group(1).replace(",", "")) == bounds.get("max"), f"{section} {key}: ({said})"
    assert checked >= 15


def test_an_upper_bound_a_table_gives_is_the_schema_s() -> None:
    for section, defaults in SECTIONS:
        for *names, meaning in re.findall(
            r"^\| `([a-z_]+)`(?:, `([a-z_]+)`)? \| [^|]+ \| (.*) \|$", section_text(section), re.M
        ):
            bound = re.search(r"\bat most ([\d,]+)(?:$|[;,)])", meaning)  # not "at most 1 / V"
            if bound is None:
                continue
            for name in (n for n in names if n):
                limits = next(f.metadata for f in dataclasses.fields(defaults) if f.name == name)
                assert limits.get("max") == float(bound.group(1).replace(",", "")), f"{section}.{name}: {bound[0]}"


def test_every_environment_variable_is_in_the_table() -> None:
    rows = dict(re.findall(r"^\| `(LOCOD_[A-Z_]+)` \| ([^|]+) \|", DOC, re.M))
    for variable, key in config_module.ENV_OVERRIDES.items():
        assert rows.get(variable) == f"`{key}`", f"{variable} -> {key} is not in docs/configuration.md's table"
    read_elsewhere = set(config_module.OTHER_VARIABLES)
    assert set(rows) == {*config_module.ENV_OVERRIDES, *read_elsewhere}
    for variable in config_module.TOOLING_VARIABLES:
        assert f"`{variable}`" in DOC


VARIABLE = re.compile(r"\bLOCOD_[A-Z_]*[A-Z]\b")


def variables_in_code() -> set[str]:
    """Every ``LOCOD_*`` name the daemon, the client (api/commands/ too), the policy, the scripts, the units,
    the CI script and the test fixtures hold."""
    folders = ("api", "daemon", "policy", "scripts", "systemd")
    sources = [p for f in folders for p in (REPO / f).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    sources += [REPO / "tests" / "conftest.py", REPO / ".ci" / "run"]
    return {v for path in sources for v in VARIABLE.findall(path.read_text(errors="replace"))}


def test_every_locod_variable_the_code_names_is_documented() -> None:
    """Read anywhere (the daemon, the client, the scripts, the units, the test fixtures): a user sees it there."""
    named = variables_in_code()
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


# -- what every doc points at ------------------------------------------------------------------------

DOCS = {p.relative_to(REPO): p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]}
LINK = re.compile(r"\]\(([^)\s]+)\)")
# "(docs/operations.md, When the disk fills)", `docs/http.md, "Web pages"`: a section named in prose
SECTION_REFERENCE = re.compile(r"docs/([a-z]+\.md), \"?([A-Z][^\",;:)]*)")


def headings(text: str) -> list[str]:
    """A doc's section titles, as written and as GitHub's anchors, and the bold leads that open a paragraph
    (**Dialogue cache.**), which the docs name as sections too."""
    titles = [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")]
    anchors = [re.sub(r"[^\w\- ]", "", t.lower()).replace(" ", "-") for t in titles]
    return titles + anchors + re.findall(r"^\*\*([^*]+?)\.?\*\*", text, re.M)


@pytest.mark.parametrize("doc", list(DOCS), ids=str)
def test_every_link_and_named_section_resolves(doc: Path) -> None:
    text = DOCS[doc]
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        linked = (REPO / doc).parent / path if path else REPO / doc
        assert linked.exists(), f"{doc} links {target}, which is not there"
        if anchor:
            assert anchor in headings(linked.read_text()), f"{doc} links {target}: no such section"
    for name, title in SECTION_REFERENCE.findall(" ".join(text.split())):
        sections = headings(DOCS[Path("docs") / name])
        title = title.strip()
        found = any(title.startswith(s.strip("`")) or s.startswith(title) for s in sections)
        assert found, f"{doc}: docs/{name} has no section {title!r}"


@pytest.mark.parametrize("doc", list(DOCS), ids=str)
def test_every_file_and_test_a_doc_names_exists(doc: Path) -> None:
    """The modules, scripts and tests a doc cites as where something is or is proven."""
    text = DOCS[doc]
    paths = set(re.findall(r"(?<![\w/.~-])((?:api|daemon|policy|scripts|tests|systemd)/[\w/-]*\.\w+)", text))
    missing = [p for p in sorted(paths) if not (REPO / p).exists()]
    folders = ("api", "daemon", "policy", "scripts", "tests")  # a module named alone, `turn.py`, is in one of them
    missing += [
        m for m in sorted(set(re.findall(r"`(\w+\.py)", text))) if not any((REPO / f / m).exists() for f in folders)
    ]
    assert not missing, f"{doc} names files that are not there: {missing}"
    tests_source = "".join(p.read_text() for p in (REPO / "tests").glob("test_*.py"))
    named = set(re.findall(r"\b(test_\w+?)(?:\.\.\.|\.py|\b)", text))
    unknown = [t for t in sorted(named) if f"def {t}" not in tests_source and not (REPO / "tests" / f"{t}.py").exists()]
    assert not unknown, f"{doc} cites tests that are not there: {unknown}"


def names_of_the_code() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Each module's top-level names, and each class's attributes (methods, fields, what ``self.x =`` sets),
    of api/, daemon/ and policy/."""
    modules: dict[str, set[str]] = {}
    classes: dict[str, set[str]] = {}
    for path in [*REPO.glob("api/*.py"), *REPO.glob("daemon/*.py"), *REPO.glob("policy/*.py")]:
        tree = ast.parse(path.read_text())
        top = modules.setdefault(path.stem, set())
        for node in tree.body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                top |= {alias.asname or alias.name for alias in node.names}
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                top |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            elif isinstance(node, ast.FunctionDef | ast.ClassDef):
                top.add(node.name)
        for cls in (node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)):
            attrs = classes.setdefault(cls.name, set())
            for n in ast.walk(cls):
                if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef):
                    attrs.add(n.name)
                elif isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name):
                    attrs.add(n.target.id)
                elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) and ast.unparse(n.value) == "self":
                    attrs.add(n.attr)
    return modules, classes


def test_every_class_attribute_and_module_name_the_docs_name_exists() -> None:
    """`FairGate.idle_slot`, `Acceptance.gate`, `attachments.DECODES`, `rule.policy_terms`: what a reader
    looks up; a module's name beside a config section's (`attachments.max_bytes`) may be either, and
    `turn.py` or `messplus.npz` is a file."""
    modules, classes = names_of_the_code()
    keys = {name: set(keys_of(defaults)) for name, defaults in SECTIONS}
    for doc, text in DOCS.items():
        for cls, attr in set(re.findall(r"`([A-Z]\w+)\.([a-z_]\w*)`", text)):
            assert cls == "RunOptions" or attr in classes.get(cls, ()), f"{doc} names {cls}.{attr}: not in the code"
        for module, name in set(re.findall(r"`(?:locod\.)?(?:daemon\.|policy\.)?([a-z_]+)\.(\w+)`", text)):
            if module in modules and name not in ("py", "npz"):
                assert name in modules[module] | keys.get(module, set()), f"{doc} names {module}.{name}: not there"


# `section.key` spans that are something else: Python's module, a log file, a field of `status`.
NOT_KEYS = {("http", "client"), ("daemon", "log"), ("routing", "attained")}


def test_every_config_key_the_docs_name_exists() -> None:
    """`routing.sla`, `daemon.max_message_bytes`: a key renamed in daemon/config.py must be renamed in every
    doc that sends the reader to it (a `module.py` aside)."""
    keys = {name: set(keys_of(defaults)) for name, defaults in SECTIONS}
    for doc, text in DOCS.items():
        named = set(re.findall(r"`([a-z]+)\.([a-z_]+)(?![\w.])", text)) - NOT_KEYS
        unknown = sorted(f"{s}.{k}" for s, k in named if s in keys and k not in keys[s] and k != "py")
        assert not unknown, f"{doc} names config keys the schema lacks: {unknown}"


# OpenAI's names that docs/http.md lists as ignored or refused by kind: the door never spells them out.
OPENAI_ONLY = {
    "frequency_penalty",
    "presence_penalty",
    "parallel_tool_calls",
    "service_tier",
    "input_audio",
    "input_text",
}


def test_every_snake_case_name_a_doc_gives_is_still_in_the_code() -> None:
    """An error code, key, field, column, option or test renamed in the code leaves the old name in a doc
    that no source file holds any more (a counter's `_total` is added by prometheus-client)."""
    folders = ("api", "daemon", "policy", "scripts", "systemd", "tests", "models")
    files = [
        p
        for f in folders
        for p in (REPO / f).rglob("*")
        if p.is_file() and p.suffix in (".py", ".sh", ".service", ".conf", ".toml")
    ]
    source = "".join(p.read_text() for p in files) + (REPO / "pyproject.toml").read_text()
    for doc, text in DOCS.items():
        named = set(re.findall(r"`([a-z][a-z0-9]*(?:_[a-z0-9]+)+)`", text)) - OPENAI_ONLY
        gone = sorted(n for n in named if n not in source and n.removesuffix("_total") not in source)
        assert not gone, f"{doc} names what no source file holds: {gone}"


# "`attachments.max_bytes` (20 MiB each)", "`cloud.deadline_s`, 300 s": a key's default, cited where it matters
CITED_DEFAULT = re.compile(
    r"`([a-z]+)\.([a-z_]+)`(?: \(|, )(?:default )?(\d[\d,]*(?:\.\d+)?)(?: (MiB|s))?(?=[),;]| each)"
)


@pytest.mark.parametrize("doc", list(DOCS), ids=str)
def test_a_default_cited_beside_its_key_is_the_schema_s(doc: Path) -> None:
    config = Config()
    for section, key, value, unit in CITED_DEFAULT.findall(" ".join(DOCS[doc].split())):
        default = getattr(getattr(config, section), key)
        scale = 1 << 20 if unit == "MiB" and not key.endswith("_mb") else 1
        assert float(value.replace(",", "")) * scale == default, f"{doc}: {section}.{key} is {default} by default"


# -- docs/http.md against the HTTP door --------------------------------------------------------------

HTTP_DOC = DOCS[Path("docs/http.md")]
HTTP_SOURCES = [REPO / "daemon" / name for name in ("httpapi.py", "httpconn.py", "httporigin.py", "openai_wire.py")]
HTTP_ERRORS = HTTP_DOC[HTTP_DOC.index("### Errors") : HTTP_DOC.index("\n## ", HTTP_DOC.index("### Errors"))]


def http_codes_in_source() -> set[str]:
    """The codes the HTTP door gives of its own (OpenAI's error shape): ``HttpError(status, message, code)``
    and ``bad(message, param, code)``, by position or keyword."""
    found: set[str] = set()
    for path in HTTP_SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] in ("HttpError", "bad"):
                values = [*node.args[2:3], *(k.value for k in node.keywords if k.arg == "code")]
                constants = [c.value for v in values for c in ast.walk(v) if isinstance(c, ast.Constant)]  # a or b
                found |= {c for c in constants if isinstance(c, str)}
    return found


def test_every_error_code_http_md_names_is_one_the_daemon_gives() -> None:
    known = http_codes_in_source() | set(codes_in_source())
    named = {c for row in re.findall(r"^\| \d{3} \|.*$", HTTP_ERRORS, re.M) for c in re.findall(r"`([a-z_]+)`", row)}
    named |= set(re.findall(r"\b[45]\d\d `([a-z_]+)`", HTTP_DOC))  # "400 `remote_image`"
    named.discard("base_url")  # the client's setting the 404 row names, no code
    assert "remote_image" in named and "host_not_allowed" in named
    assert not sorted(named - known), f"docs/http.md names codes the HTTP door never gives: {sorted(named - known)}"


def test_the_refused_parameters_are_those_the_door_refuses() -> None:
    row = re.search(r"^\| (`tools`.*?) \| 400 `unsupported_parameter`", HTTP_DOC, re.M)
    assert row and re.findall(r"`([a-z_]+)`", row.group(1)) == list(openai_wire.UNSUPPORTED)


def test_the_metrics_table_lists_what_metrics_py_serves() -> None:
    """Counters are exposed with `_total`; every family metrics.py yields is in the table and nothing else."""
    source = (REPO / "daemon" / "metrics.py").read_text()
    served = {f"{n}_total" for n in re.findall(r'CounterMetricFamily\(\s*"(locod_\w+)"', source)}
    served |= set(re.findall(r'(?:_histogram|GaugeMetricFamily)\(\s*"(locod_\w+)"', source))
    served |= set(re.findall(r'^\s*"(locod_\w+)": \(', source, re.M))  # the gauges set from one dict
    assert len(served) == 13
    table = HTTP_DOC[HTTP_DOC.index("| metric | type | labels |") :].split("\n\n")[0]
    documented = {m for row in re.findall(r"^\| (`locod_[^|]*)\|", table, re.M) for m in re.findall(r"`(\w+)`", row)}
    assert documented == served


# -- the scripts the docs run ------------------------------------------------------------------------


def scripts_shown() -> dict[str, set[str]]:
    """Each script a doc runs (`python scripts/replay.py`) or shows with flags (`build_trace.py --questions
    FILE`, in prose or a code block), with the flags it shows for it."""
    shown: dict[str, set[str]] = {}
    for text in DOCS.values():
        for name, tail in re.findall(r"\b(\w+\.py)((?: [^`|#;&>\n]*)?)", text):
            flags = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", tail))
            if (REPO / "scripts" / name).exists() and (flags or re.search(rf"python3? scripts/{name}", text)):
                shown.setdefault(name, set()).update(flags)
    return shown


SCRIPTS_SHOWN = scripts_shown()


@pytest.mark.parametrize("script", sorted(SCRIPTS_SHOWN))
def test_every_script_a_doc_runs_takes_the_flags_shown(script: str) -> None:
    """`--help` answers at once (it ran every attack before: attacks.py took any word for "all") and lists
    each flag a doc gives the script."""
    shown = subprocess.run(
        [sys.executable, f"scripts/{script}", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert shown.returncode == 0, shown.stderr
    assert [flag for flag in sorted(SCRIPTS_SHOWN[script]) if flag not in shown.stdout] == []
