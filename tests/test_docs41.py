"""docs/troubleshooting.md against the code: a user looks up what they saw there, so each message it quotes must
be one locod can print, each command it shows must parse, each code it names must be one locod gives, and
every code locod gives must be on it or in docs/protocol.md's Errors, which the page sends the reader to. A few
of its quotes are provoked for real and matched against what `locod` printed."""

from __future__ import annotations

import ast
import errno
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest

from locod import cli

from .conftest import DaemonHandle, start_daemon
from .test_docs import SECTIONS, keys_of
from .test_docs_protocol import (
    CODE_BLOCK,
    INLINE_CODE,
    SOURCE_CODES,
    TABLE_CODES,
    command_lines,
)
from .test_docs_protocol import test_every_command_line_the_docs_show_parses as parses_as_the_docs_do

REPO = Path(__file__).resolve().parent.parent
PAGE = (REPO / "docs" / "troubleshooting.md").read_text()
# What varies in a quote, as the page says: NAME, FILE, N (and any number), `...`; a name's quotes are repr's
PLACEHOLDER = re.compile(r"\.\.\.|'?\b(?:NAME|FILE|DIR|URL|ID|N)\b'?|(?<![\w.])\d+(?:\.\d+)*%?(?!\w)")
# A message's code, named right after its quote: "`locod: no model named 'NAME'; ...` (`unknown_model`)"
NAMED_CODE = re.compile(r"` \(`([a-z_]+)`")
# What wraps a message where it is printed: the CLI's prefixes, a notice's brackets
WRAPPERS = re.compile(r"^(?:locod: |warning: |note: |\[)|\]$")
NOT_MESSAGES = ("locod", "sudo", "until", "timeout", "systemctl", "journalctl", "ss")  # commands the page shows


def quoted_messages() -> list[str]:
    """The page's code spans of three words or more that are no command line, TOML or JSON: its quotes."""
    spans = [" ".join(s.split()) for s in INLINE_CODE.findall(CODE_BLOCK.sub("", PAGE))]
    return sorted(
        {
            s
            for s in spans
            if len(s.split()) >= 3 and s.split()[0] not in NOT_MESSAGES and " = " not in s and not s.startswith("{")
        }
    )


def _source_strings() -> str:
    """Every string literal of api/, daemon/ and policy/ (an f-string's fixed parts each alone), the system's
    error texts (``Address already in use``) and the config keys (``routing.sla``), between NULs: a message is
    pieces of these glued by what the code puts between them."""
    pieces = [os.strerror(number) for number in errno.errorcode]
    pieces += [f"{section}.{key}" for section, defaults in SECTIONS for key in keys_of(defaults)]
    for path in [*REPO.glob("api/**/*.py"), *REPO.glob("daemon/*.py"), *REPO.glob("policy/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                pieces.append(node.value)
    return "\0" + "\0".join(pieces) + "\0"


SOURCE = _source_strings()
PART = 4  # the shortest part with letters of a message split across literals


@cache
def _made_of_pieces(text: str, first: bool = True) -> bool:
    """Whether ``text`` is what the code can print: within one literal, or a literal's end, then whole
    literals, then a literal's start (what an f-string's interpolations or a join put between them), each
    part glue (`: `, `.`) or of some length: of short words ("no ", "has") any reworded message is made."""
    if first and text in SOURCE:
        return True
    if not first and _substantial(text) and "\0" + text in SOURCE:
        return True
    for cut in range(len(text) - 1, 0, -1):
        part = text[:cut]
        found = (part + "\0" in SOURCE) if first else ("\0" + part + "\0" in SOURCE)
        if found and _substantial(part) and _made_of_pieces(text[cut:], False):
            return True
    return False


def _substantial(part: str) -> bool:
    return len(part) >= PART or not re.search(r"[A-Za-z]", part)


def fixed_parts(quote: str) -> list[str]:
    """A quote's parts between its placeholders, those with a word in them (`': ` is glue, not a claim)."""
    return [p for p in PLACEHOLDER.split(WRAPPERS.sub("", quote)) if re.search(r"[a-z]{3}", p)]


QUOTES = quoted_messages()


def test_the_quote_scan_finds_quotes_and_leaves_commands() -> None:
    assert "locod: the prompt read from standard input is empty" in QUOTES
    assert any(q.startswith("[the cloud answer failed") for q in QUOTES)
    assert not [q for q in QUOTES if q.startswith(("locod ", "until ", "timeout "))]
    assert fixed_parts("locod: no decision with id N") == ["no decision with id "]
    assert _made_of_pieces("no decision with id ")
    reworded = ("no decision with that id ", "no decisions with id ", "no decision has id ")
    assert not [m for m in reworded if _made_of_pieces(m)]
    assert _made_of_pieces(" is a PDF: locod reads UTF-")  # " is ", "a PDF" (filekinds.py), ": locod reads UTF-..."


@pytest.mark.parametrize("quote", QUOTES)
def test_every_message_the_page_quotes_is_one_the_code_can_print(quote: str) -> None:
    parts = fixed_parts(quote)
    assert sum(len(p) for p in parts) >= 12, f"too little of {quote!r} is fixed to tell its message"
    missing = [p for p in parts if not _made_of_pieces(p)]
    assert not missing, f"docs/troubleshooting.md quotes {quote!r}; no source string holds {missing}"


def test_every_error_code_is_on_the_page_or_in_protocol_md_s_errors() -> None:
    on_page = {code for code in SOURCE_CODES if f"`{code}`" in PAGE}
    assert len(on_page) >= 30, "the page covers the codes a user meets by themselves"
    elsewhere = sorted(set(SOURCE_CODES) - on_page - TABLE_CODES)
    assert not elsewhere, f"on neither docs/troubleshooting.md nor docs/protocol.md's Errors: {elsewhere}"
    assert "protocol.md#errors" in PAGE, "the page sends the reader to the full table"


def test_every_code_the_page_names_for_a_message_is_one_locod_gives() -> None:
    named = set(NAMED_CODE.findall(PAGE))
    assert "unknown_model" in named and "http_bind" in named
    assert not sorted(named - set(SOURCE_CODES)), "docs/troubleshooting.md names codes locod never gives"


def test_the_exit_status_table_is_the_cli_s() -> None:
    table = PAGE[PAGE.index("## Exit status") : PAGE.index("\n## ", PAGE.index("## Exit status") + 1)]
    rows = dict(re.findall(r"^\| ([\d, ]+) \| (.*)$", table, re.M))
    assert set(rows) == {"0", "1", *map(str, cli.EXIT_CODES.values()), "130, 143, 141"}
    for cls, status in cli.EXIT_CODES.items():
        assert f"`{cls.code}`" in rows[str(status)], f"exit {status} is {cls.__name__}'s, `{cls.code}`"
    assert "`usage`" in rows["2"]


PAGE_COMMANDS = sorted(set(command_lines(PAGE)))


def test_the_page_shows_command_lines() -> None:
    assert "decisions --outcome fallback --since 1d" in PAGE_COMMANDS
    assert "--config FILE serve" in PAGE_COMMANDS


@pytest.mark.parametrize("line", PAGE_COMMANDS)
def test_every_command_line_the_page_shows_parses(line: str, capsys: pytest.CaptureFixture[str]) -> None:
    parses_as_the_docs_do("docs/troubleshooting.md", line, capsys)


def test_readme_s_docs_list_links_the_page() -> None:
    docs_list = (REPO / "README.md").read_text().split("## Documentation")[1]
    assert "(docs/troubleshooting.md)" in docs_list


# -- the quotes against what locod prints ------------------------------------------------------------


def quote_of(start: str) -> re.Pattern[str]:
    """The page's quote that begins with ``start``, as a pattern its placeholders match anything in."""
    quote = next(q for q in QUOTES if q.startswith(start))
    fixed = PLACEHOLDER.split(WRAPPERS.sub("", quote))
    return re.compile(".+?".join(re.escape(part) for part in fixed))


def said(result: subprocess.CompletedProcess[str]) -> str:
    """What a command printed on stderr, its whitespace collapsed as the page's quotes are read."""
    return " ".join(result.stderr.split())


def test_the_quotes_are_what_locod_prints(daemon: DaemonHandle, tmp_path: Path) -> None:
    """Provoked for real: a model that is not there, a PDF, an empty prompt, a label for no decision, and a
    config that does not validate (the reload is rejected, exit 2)."""
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(b"%PDF-1.4\n%...\n")
    cases = [
        (("ask", "--model", "nosuch", "hi"), 1, "locod: no model named"),
        (("ask", "--attach", str(pdf), "summarise"), 1, "locod: document 'NAME' is a PDF"),
        (("ask",), 1, "locod: the prompt read from standard input is empty"),
        (("feedback", "99999", "good"), 1, "locod: no decision with id"),
    ]
    for args, status, start in cases:
        result = daemon.cli(*args, stdin="")
        assert result.returncode == status, (args, result.stderr)
        assert quote_of(start).search(said(result)), (start, result.stderr)
    good = daemon.config_path.read_text()
    daemon.config_path.write_text(good + "[routing]\nsla = 2\n")
    rejected = daemon.cli("reload")
    assert rejected.returncode == 2
    assert quote_of("locod: reload rejected").search(said(rejected)), rejected.stderr
    assert quote_of("locod: FILE: routing.sla must be").search(said(rejected)), rejected.stderr


def test_a_start_refused_says_what_the_page_quotes(tmp_path: Path, model_path: Path) -> None:
    """A default model cut short, and a second daemon on the same directories: `locod serve`
    exits 3 and 4 with the page's lines."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(model_path, models / model_path.name)
    with (models / model_path.name).open("r+b") as f:
        f.truncate(model_path.stat().st_size // 2)
    handle = start_daemon(tmp_path / "cut", models, {}, wait=False)
    assert handle.proc.wait(120) == 3
    assert quote_of("locod: model 'NAME': FILE is cut short").search(" ".join(handle.log().split())), handle.log()
    running = start_daemon(tmp_path / "first", model_path.parent, {})
    try:
        second = start_daemon(running.home, model_path.parent, {}, wait=False)
        assert second.proc.wait(120) == 4
        assert quote_of("locod: another locod daemon").search(" ".join(second.log().split())), second.log()
    finally:
        running.stop()
