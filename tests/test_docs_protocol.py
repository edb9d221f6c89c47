"""docs/protocol.md, README.md and docs/operations.md against the code they describe: users copy error codes,
frame fields, op results and command lines from them (every doc's command lines are parsed; README's and
operations.md's are run), so a code, field, op or flag added, renamed or removed must show there too (as
tests/test_docs.py holds docs/configuration.md to the config schema)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import zmq

from locod import cli, errors, protocol
from locod.daemon.config import load_config
from locod.policy import train_cli

from .conftest import DaemonHandle, locod_command

REPO = Path(__file__).resolve().parent.parent
PROTOCOL = (REPO / "docs" / "protocol.md").read_text()
# The HTTP door's own error codes (OpenAI's error shape, docs/http.md) are not locod.errors codes.
HTTP_ERROR_CALLS = {"HttpError", "bad"}
CODE = re.compile(r"[a-z][a-z_]*[a-z]")


def section(doc: str, title: str) -> str:
    """The part of ``doc`` under ``## title``, up to the next section of that level."""
    start = doc.index(f"\n## {title}\n")
    end = doc.find("\n## ", start + 1)
    return doc[start : end if end > 0 else len(doc)]


def _called(node: ast.Call) -> str:
    func = node.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def codes_in_source() -> dict[str, str]:
    """Every error code the code gives a LocodError ({code: where}): a class's own ``code``, a constant of
    api/errors.py (``MODEL_RELOADED``, which the daemon and the HTTP door share), a ``code=`` given to any
    call or as a parameter's default, an ``ErrorFrame``'s, and the cloud's codes, which daemon/cloud.py and
    daemon/bounded_http.py pass on positionally."""
    found: dict[str, str] = {}
    for path in [*REPO.glob("api/*.py"), *REPO.glob("daemon/*.py"), *REPO.glob("policy/*.py")]:
        tree = ast.parse(path.read_text(), str(path))
        cloud = path.name in ("cloud.py", "bounded_http.py")
        for node in ast.walk(tree):
            values: list[ast.expr] = []
            if isinstance(node, ast.Call) and _called(node) not in HTTP_ERROR_CALLS:
                values += [k.value for k in node.keywords if k.arg == "code"]
                if _called(node) == "ErrorFrame":
                    values += node.args[1:2]
            elif isinstance(node, ast.ClassDef) and path.name == "errors.py":
                values += [
                    s.value for s in node.body if isinstance(s, ast.Assign) and ast.unparse(s.targets[0]) == "code"
                ]
            elif isinstance(node, ast.Module) and path.name == "errors.py":
                values += [
                    s.value for s in node.body if isinstance(s, ast.Assign) and ast.unparse(s.targets[0]).isupper()
                ]
            elif isinstance(node, ast.arguments):
                named = [*node.posonlyargs, *node.args][-len(node.defaults) :] if node.defaults else []
                values += [d for a, d in zip(named, node.defaults) if a.arg == "code"]
            if cloud and isinstance(node, ast.Constant) and str(node.value).startswith("cloud_"):
                values.append(node)
            for value in values:
                if isinstance(value, ast.Constant) and isinstance(value.value, str) and CODE.fullmatch(value.value):
                    found.setdefault(value.value, f"{path.relative_to(REPO)}:{value.lineno}")
    return found


SOURCE_CODES = codes_in_source()
ERRORS = section(PROTOCOL, "Errors")
# The codes a table of the section names in its first column ("`db_locked` (kind `storage`)": both).
TABLE_CODES = {c for cell in re.findall(r"^\| (`[^|]*)\|", ERRORS, re.M) for c in re.findall(r"`([a-z_]+)`", cell)}


def test_the_code_scan_finds_the_codes_of_every_kind() -> None:
    """The scan itself: codes given by keyword, by a class, by a default, positionally in the cloud's code."""
    for code in ("bad_field", "busy", "cloud_stream_cut", "cloud_http", "internal", "extra_frames", "policy_slow"):
        assert code in SOURCE_CODES, code
    assert "reasoning_effort" not in SOURCE_CODES  # the HTTP door's parameter names are no codes


def test_every_error_class_is_a_documented_kind() -> None:
    kinds = dict(re.findall(r"^\| `([a-z_]+)` \| `([A-Za-z]+)` \|", ERRORS, re.M))
    classes = {cls.code: cls.__name__ for cls in errors._BY_CODE.values()}
    assert kinds == classes, "docs/protocol.md's kind table must list every class of api/errors.py, by its code"


@pytest.mark.parametrize("code", sorted(SOURCE_CODES))
def test_every_error_code_is_documented_with_when_it_happens(code: str) -> None:
    assert code in TABLE_CODES, f"{code} ({SOURCE_CODES[code]}) is not in a table of docs/protocol.md's Errors"


def test_every_code_the_docs_name_exists() -> None:
    unknown = sorted(TABLE_CODES - set(SOURCE_CODES))
    assert not unknown, f"docs/protocol.md's Errors names codes locod never gives: {unknown}"


# -- requests, frames and op results -----------------------------------------------------------------

FRAME_SKETCH = re.compile(r'\{"(?:v": 1, "id": [^,]+, ")?type": "([a-z]+)"(.*?)\}`', re.S)
SKETCH_VALUE = re.compile(r':\s*(?:"[a-z]+"(?:\|"[a-z]+")*|<[^>]*>|\[[^\]]*\]|[a-z]+|\.\.\.)')


def frame_sketches() -> dict[str, set[str]]:
    """The fields each ``{"type": ...}`` sketch in docs/protocol.md names, its values (`"ok"|"fallback"`,
    `<id>`, `[names]`) left out."""
    sketches: dict[str, set[str]] = {}
    for kind, rest in FRAME_SKETCH.findall(PROTOCOL):
        sketches.setdefault(kind, set()).update(re.findall(r'"([a-z_]+)"', SKETCH_VALUE.sub("", rest)))
    return sketches


def test_every_frame_type_is_sketched_with_the_fields_of_its_dataclass() -> None:
    sketches = frame_sketches()
    assert set(sketches) == set(protocol.FRAME_TYPES), "docs/protocol.md must sketch every reply frame type"
    for kind, cls in protocol.FRAME_TYPES.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        optional = {f.name for f in dataclasses.fields(cls) if f.metadata.get("omit_if_none")}
        assert sketches[kind] <= fields | {"v", "id"}, f"the {kind} frame's sketch names fields it has not"
        assert fields - optional <= sketches[kind], f"the {kind} frame's sketch leaves out fields"
        for name in optional:  # said beside the sketch: (+ "notice" when ...), that carries `decision`
            assert re.search(rf'\+ "{name}"|\+\s*`"{name}"|carries `{name}`', PROTOCOL), f"{kind}.{name}"


def test_the_request_table_names_every_op_and_chat_option() -> None:
    requests = section(PROTOCOL, "Requests")
    op_row = re.search(r"^\| `op` \| string \| (.*) \|$", requests, re.M)
    assert op_row and re.findall(r"`([a-z]+)`", op_row.group(1)) == list(protocol.OPS)
    options_row = re.search(r"^\| `options` \| .*$", requests, re.M)
    assert options_row
    assert [o for o in protocol.OPTIONS if f"`{o}`" not in options_row.group(0)] == []
    others = re.findall(r"^\| `([a-z]+)` \| ", requests.split("### Other ops")[1], re.M)
    assert sorted(op for op in others if op in protocol.OPS) == sorted(op for op in protocol.OPS if op != "chat")


SKETCH_KEY = re.compile(r"([a-z_]+)(?::[^,}]*)?\s*[,}]")


def op_result_fields(op: str) -> set[str]:
    """The fields the Other ops table's ``result.data`` cell sketches for ``op``: `{pong: true, pid, version}`."""
    row = re.search(rf"^\| `{op}` \| [^|]* \| `(\{{[^`]*\}})`", PROTOCOL, re.M)
    assert row, f"docs/protocol.md's Other ops table sketches no result for {op}"
    return set(SKETCH_KEY.findall(row.group(1)))


def status_table() -> dict[str, str]:
    """``status``'s table: each field it names in the first column, with what the second says of it."""
    start = PROTOCOL.index("`status` fields")
    rows = re.findall(r"^\| (`[^|]*) \| ([^\n]*) \|$", PROTOCOL[start : PROTOCOL.index("\n## ", start)], re.M)
    return {name: said for names, said in rows for name in re.findall(r"`([a-z_]+)`", names)}


def decision_columns() -> set[str]:
    """The columns docs/operations.md's table of the decision log names."""
    doc = (REPO / "docs" / "operations.md").read_text()
    table = doc[doc.index("| column | when written |") :].split("\n\n")[0]
    return {c for cell in re.findall(r"^\| (`[^|]*)\|", table, re.M) for c in re.findall(r"`([a-z_0-9]+)`", cell)}


def request(sock: zmq.Socket[bytes], op: str, **fields: Any) -> list[dict[str, Any]]:
    """Every reply frame to one request, up to its last (``done``, ``error`` or ``result``)."""
    sock.send(json.dumps({"v": 1, "id": op, "op": op, **fields}).encode())
    frames: list[dict[str, Any]] = []
    while not frames or frames[-1]["type"] not in protocol.LAST_FRAMES:
        assert sock.poll(300_000), f"no answer to {op} for 300 s"
        frames.append(json.loads(sock.recv()))
    return frames


def result(sock: zmq.Socket[bytes], op: str, **fields: Any) -> Any:
    (frame,) = request(sock, op, **fields)
    assert frame["type"] == "result", frame
    return frame["data"]


def test_each_op_answers_with_the_fields_the_docs_name(daemon: DaemonHandle) -> None:
    """Every op over a raw DEALER, as a client written from docs/protocol.md sends it: a chat's frames and
    each other op's result hold the fields the doc names for them (a decision record, operations.md's)."""
    sketches = frame_sketches()
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.endpoint)
    try:
        for options in ({"max_tokens": 4}, {"max_tokens": 4, "stream": False}):
            for frame in request(sock, "chat", prompt="Hi", options=options):
                sent, sketched = set(frame) - {"v", "id", "type"}, sketches[frame["type"]]
                besides = {f.name for f in dataclasses.fields(protocol.FRAME_TYPES[frame["type"]]) if f.metadata}
                assert sketched <= sent <= sketched | besides, frame  # besides: (+ "text" when ...)
        for op, fields in (
            ("ping", {}),
            ("config", {}),
            ("reload", {}),
            ("feedback", {"decision": 1, "satisfied": True}),
        ):
            assert set(result(sock, op, **fields)) == op_result_fields(op), f"{op}'s result"
        status, said = result(sock, "status"), status_table()
        assert set(status) == set(said), "status' fields against docs/protocol.md's table"
        for name, value in status.items():
            if isinstance(value, dict):
                unsaid = [k for k in value if f"`{k}`" not in said[name]]
                assert not unsaid, f"status.{name} holds fields its row does not name: {unsaid}"
        unsaid = [k for k in status["local"]["cache"] if f"`{k}`" not in said["local"]]
        assert not unsaid, f"status.local.cache: {unsaid}"
        records = result(sock, "decisions", limit=1)
        assert set(records[0]) == decision_columns(), "a decisions record against docs/operations.md's columns"
        assert result(sock, "decisions", of="chatcmpl-none") == []  # "none when no record matches"
    finally:
        sock.close()


# -- command lines in the docs -------------------------------------------------------------------------

COMMAND_DOCS = ("README.md", "docs/operations.md")  # run as written below; every doc's lines are parsed
ALL_DOCS = ("README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")))
CODE_BLOCK = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
INLINE_CODE = re.compile(r"`([^`]+)`")
LEADS = ("sudo", "|", "&&", ";", "until", "do", "then")  # a word after which `locod` is the command
SHELL_END = re.compile(r"\s(?:\||&&|;|>|2>|#)")  # a pipe, a redirection or a comment ends the command
PLACEHOLDERS = {"ID": "1", "<id>": "1", "...": None}  # what a placeholder stands for (None: left out)
# Flags of other programs the docs name: pip's, the install scripts' (checked against them below),
# systemd-analyze's, sqlite-utils'.
OTHER_FLAGS = {
    "--config-settings": "pip",
    "--force-reinstall": "pip",
    "--index-url": "pip",
    "--no-cache-dir": "pip",
    "--no-deps": "pip",
    "--gpu": "scripts/install.sh",
    "--user": "scripts/install.sh",
    "--purge": "scripts/uninstall.sh",
    "--offline": "systemd-analyze",
}


def command_lines(doc: str) -> list[str]:
    """Each `locod ...` command line of a doc, from its code blocks and its inline code, what follows
    `locod` up to a pipe, a redirection or a comment (`sudo -u locod` names a user, not the command)."""
    lines = [line for block in CODE_BLOCK.findall(doc) for line in block.splitlines()]
    lines += [span.replace("\n", " ") for span in INLINE_CODE.findall(CODE_BLOCK.sub("", doc))]
    found = []
    for line in lines:
        words = line.split()
        for i, word in enumerate(words):
            before = words[max(0, i - 2) : i]
            leads = not before or before[-1] in LEADS or before[0] in ("-u", "timeout")
            if (word == "locod" or word.endswith("/bin/locod")) and leads and before[-1:] != ["-u"] and words[i + 1 :]:
                rest = " ".join(words[i + 1 :])
                end = SHELL_END.search(" " + rest)
                found.append(rest[: end.start() - 1 if end else len(rest)].strip())
                break
    return found


DOC_COMMANDS = sorted({(name, line) for name in ALL_DOCS for line in command_lines((REPO / name).read_text())})


def _words(line: str) -> list[str]:
    """A command line's words, a usage line's too: `[--out report.png|report.html]` as its first choice."""
    words = [PLACEHOLDERS.get(w, w) for w in shlex.split(line)]
    return [w.strip("[]").split("|")[0] for w in words if w is not None]


def _parse(words: list[str]) -> argparse.Namespace:
    """As `locod` parses a command line (main): the trainer's own options after `policy train`."""
    parser = cli._parser()
    args, extra = parser.parse_known_args(cli._help_as_an_option(words, parser))
    if args.func is cli.cmd_policy_train:
        train_cli.parser(Path("policy.onnx")).parse_args(extra)
    else:
        assert not extra, f"unrecognized arguments: {extra}"
    return args


def test_the_scan_finds_the_command_lines_of_both_docs() -> None:
    lines = {line for _, line in DOC_COMMANDS}
    for line in ("--endpoint tcp://127.0.0.1:5557 ask", "decisions --json", "policy train --steps 200000"):
        assert line in lines
    assert ("docs/http.md", "serve --set http.listen=127.0.0.1:8080") in DOC_COMMANDS  # the other docs' too
    assert not [line for line in lines if line.split()[0] in ("bash", "sqlite3", "-f")]  # sudo -u locod X


def _names_a_command(words: list[str], parser: argparse.ArgumentParser | None = None) -> bool:
    """Whether ``words`` name a command, or a group of them, and perhaps flags of its own without their values
    (`locod models pull`, `locod models`, `locod ask --attach`, said in prose), not a command line."""
    subparsers = [a for a in (parser or cli._parser())._actions if isinstance(a, argparse._SubParsersAction)]
    if subparsers and words and words[0] in subparsers[0].choices:
        return _names_a_command(words[1:], subparsers[0].choices[words[0]])
    return parser is not None and all(word in parser._option_string_actions for word in words)


def _parses(line: str) -> bool:
    try:
        _parse(_words(line))
    except SystemExit as exc:
        return exc.code == 0
    return True


@pytest.mark.parametrize(("doc", "line"), DOC_COMMANDS, ids=[f"{d}: locod {c}" for d, c in DOC_COMMANDS])
def test_every_command_line_the_docs_show_parses(doc: str, line: str, capsys: pytest.CaptureFixture[str]) -> None:
    if _names_a_command(_words(line)):
        return
    try:
        _parse(_words(line))
    except SystemExit as exc:
        assert exc.code == 0, f"{doc}: `locod {line}`: {capsys.readouterr().err.strip()}"


def _options(parser: argparse.ArgumentParser) -> set[str]:
    found = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _options(sub)
    return found


def test_every_flag_the_docs_name_is_one_of_locod_or_of_the_program_named() -> None:
    """A flag is locod's, another program's (OTHER_FLAGS), or one a script the doc names takes."""
    known = _options(cli._parser()) | _options(train_cli.parser())
    for name in ALL_DOCS:
        text = (REPO / name).read_text()
        scripts = "".join((REPO / s).read_text() for s in set(re.findall(r"scripts/\w+\.py", text)))
        flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
        unknown = sorted(f for f in flags if f not in known and f not in OTHER_FLAGS and f'"{f}"' not in scripts)
        assert not unknown, f"{name} names flags no locod command (nor a script it names) has: {unknown}"
    for flag, program in OTHER_FLAGS.items():
        if program.startswith("scripts/"):
            assert flag in (REPO / program).read_text(), f"{program} takes no {flag}"


# Run as written against a daemon, last `stop`; what they need: standard input, the files they attach.
# Not run: what downloads (`models pull`, no network here), starts a daemon, trains or draws (the extras),
# or needs a tcp endpoint (`--endpoint`); their command lines are parsed above.
NOT_RUN = ("serve", "models pull", "policy train", "report", "--endpoint")
STDIN = {"chat": "What is 2+2?\n", "ask -": "What is 2+2?\n", "ask": "What is 2+2?\n"}
REFUSED = {  # exit 1, as documented: what the line names is not there on a fresh daemon
    'ask "Hello" --model qwen2.5-1.5b-instruct-q4_k_m': "no model named",  # it follows a pull
    "feedback 42 good": "no decision with id 42",
    "models rm NAME": "was not pulled",
}


def test_every_command_line_the_docs_show_runs_as_written(daemon_factory: Any, tmp_path: Path) -> None:
    handle = daemon_factory({"local": {"max_tokens": 16}})
    ok, image = cv2.imencode(".png", np.zeros((32, 48, 3), np.uint8))
    assert ok
    (tmp_path / "photo.jpg").write_bytes(bytes(image))  # an image by its bytes, whatever its name says
    (tmp_path / "notes.md").write_text("The meeting moved to Tuesday.\n")
    lines = {line for doc, line in DOC_COMMANDS if doc in COMMAND_DOCS and _parses(line)}  # not a name in prose
    run = [line for line in lines if not any(line.startswith(n) or n in line.split() for n in NOT_RUN)]
    assert "stop" in run
    # In one order whatever the set's: turns first, then what names a decision (`decisions ID`, the labels), `stop` last
    named = ("ID" in shlex.split(line) or "feedback" in line for line in run)
    for _, line in sorted(zip(named, run), key=lambda pair: (pair[1] == "stop", pair[0], pair[1])):
        result = subprocess.run(
            locod_command("--config", str(handle.config_path), *_words(line)),
            input=STDIN.get(" ".join(_words(line)), ""),  # `ask ...`: a pipe's
            capture_output=True,
            text=True,
            env=handle.env,
            cwd=tmp_path,
            timeout=300,
        )
        if line in REFUSED:
            assert result.returncode == 1 and REFUSED[line] in result.stderr, (line, result.stderr)
        else:
            assert result.returncode == 0, f"`locod {line}` exited {result.returncode}: {result.stderr}"
    assert handle.proc.wait(60) == 0  # `locod stop` stopped it


# -- where things are (docs/operations.md) ------------------------------------------------------------


def where_cells(what: str) -> list[list[str]]:
    """The code spans of each column (system service, user service, started by hand) of the row ``what``
    of docs/operations.md's "Where things are" table."""
    doc = (REPO / "docs" / "operations.md").read_text()
    row = re.search(rf"^\| {re.escape(what)} \|(.*)\|$", doc, re.M)
    assert row, f"docs/operations.md's Where things are has no row {what!r}"
    return [re.findall(r"`([^`]+)`", cell) for cell in row.group(1).split("|")]


def unit_environment(unit: str) -> dict[str, str]:
    """The variables a systemd unit of systemd/ sets, ``%S`` (the system state root) expanded."""
    text = (REPO / "systemd" / unit).read_text()
    return dict(line.split("=", 1) for line in re.findall(r"^Environment=(\S+)$", text, re.M))


# What each column's daemon finds in its environment: systemd's StateDirectory= and RuntimeDirectory=
# (the user unit sets only the latter), the unit's Environment=, a login session's $XDG_RUNTIME_DIR (an
# absolute path: a relative one is ignored, as the XDG spec says; the table writes it as the variable).
SESSION_RUNTIME = "/run/user/1000"
COLUMNS = {
    "system service": {
        "STATE_DIRECTORY": "/var/lib/locod",
        "RUNTIME_DIRECTORY": "/run/locod",
        **{k: v.replace("%S", "/var/lib") for k, v in unit_environment("locod.service").items()},
    },
    "user service": {"XDG_RUNTIME_DIR": SESSION_RUNTIME, "RUNTIME_DIRECTORY": f"{SESSION_RUNTIME}/locod"},
    "started by hand": {"XDG_RUNTIME_DIR": SESSION_RUNTIME},
}


@pytest.mark.parametrize("column", list(COLUMNS))
def test_where_things_are_is_where_the_code_puts_them(
    column: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", "/home/someone")
    assert not unit_environment("user/locod.service")  # the user unit sets nothing the table would miss
    empty = tmp_path / "config.toml"
    empty.write_text("")
    config = load_config(empty, env=COLUMNS[column])
    index = list(COLUMNS).index(column)
    db, models, socket = (where_cells(what)[index][0] for what in ("decision log, router state", "models", "socket"))

    def shown(path: Path) -> str:  # as the table writes it
        return str(path).replace("/home/someone", "~", 1).replace(SESSION_RUNTIME, "$XDG_RUNTIME_DIR", 1)

    assert shown(config.db_path) in (db, db + "locod.db"), column
    assert shown(config.models_dir) == models, column
    assert shown(config.socket_path) == socket, column
    if column == "started by hand":  # "(`/tmp/locod-$UID/locod/` without one)"
        without = load_config(empty, env={})
        assert f"{without.runtime_dir}/" == where_cells("socket")[index][1].replace("$UID", str(os.getuid()))
