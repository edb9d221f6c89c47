"""Every `locod` command and flag, swept with wrong values: each is refused as a usage error (exit 2) in a line
naming it, never with a traceback, never taken silently; every --json command prints JSON, also when it fails;
a reader that leaves (`| head`) ends a command quietly with 141.

The commands and flags are read from the parser (locod.cli), so one added there is swept without a change here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from locod.cli import _parser, _subcommands
from locod.protocol import MAX_STOP_SEQUENCES

from .conftest import DaemonHandle, free_port, locod_command

# A valid value for each positional a command requires, so that only the swept argument is wrong.
PLACEHOLDERS = {"decision": "1", "label": "good", "source": "http://127.0.0.1:9/x.gguf", "name": "x", "prompt": "hi"}
# Wrong for every numeric flag, whatever its range: not a number, not finite, not ASCII digits, Python's own
# literal forms (int() and float() take `３`, `١٢` and `5_0`).
NOT_NUMBERS = ["", "nan", "inf", "x", "0x10", "１", "١٢", "5_0", "1 2"]
NOT_CHOICES = ["", "nosuch", "LOCAL "]


def levels(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser under locod's own, with the words that reach it: (), ("ask",), ("models",), ("models", "pull")..."""
    yield path, parser
    for name, below in _subcommands(parser).items():
        yield from levels(below, (*path, name))


def global_flags() -> set[str]:
    """The options every command takes, before or after it (--config, --endpoint ...): swept once, before it."""
    return {flag for action in _parser()._actions for flag in action.option_strings}


def valued_arguments() -> Iterator[tuple[tuple[str, ...], argparse.Action]]:
    """(the words before it, the argument) for each argument of a command that takes a value; the global ones
    at locod's own level. `policy train` passes its options to the trainer (test_policy's)."""
    globals_ = global_flags()
    for path, parser in levels(_parser()):
        if _subcommands(parser) and path:
            continue  # `models`, `config`, `policy` take an action, swept as a command word below
        for action in parser._actions:
            if action.nargs == 0 or isinstance(action, argparse._SubParsersAction):
                continue
            if path and set(action.option_strings) & globals_:
                continue
            yield path, action


def command_line(path: tuple[str, ...], action: argparse.Action, value: str) -> list[str]:
    """The words that give ``action`` the ``value``, and every other required positional a valid one."""
    if not path:  # a global option: before a command that reads it
        return [action.option_strings[-1], value, "status"]
    parser = dict(levels(_parser()))[path]
    words = list(path)
    for other in parser._actions:
        if other.option_strings or (other.nargs == "?" and other.dest != action.dest):
            continue
        words.append(value if other.dest == action.dest else PLACEHOLDERS[other.dest])
    if action.option_strings:
        words += [action.option_strings[-1], value]
    return words


def named(action: argparse.Action) -> str:
    """How an error names the argument: its flag, or its metavar (its name) for a positional."""
    return action.option_strings[-1] if action.option_strings else f"argument {action.metavar or action.dest}"


def label(path: tuple[str, ...], action: argparse.Action) -> str:
    return " ".join([*path, action.option_strings[-1] if action.option_strings else action.dest])


def is_numeric(action: argparse.Action) -> bool:
    """Whether the argument reads a number: its type turns some plain number into an int or a float."""
    for sample in ("7", "128", "0.5", "4096"):
        try:
            value = action.type(sample) if callable(action.type) else None
        except (argparse.ArgumentTypeError, ValueError):
            continue
        return isinstance(value, int | float) and not isinstance(value, bool)
    return False


VALUED = list(valued_arguments())
NUMERIC = [(p, a) for p, a in VALUED if is_numeric(a)]
CHOICES = [(p, a) for p, a in VALUED if a.choices and not isinstance(a.choices, dict)]


def run_locod(home: Path, *args: str, stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    """The real `locod` with no config file, and no daemon at its socket."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCOD_")}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / "config"), LOCOD_RUNTIME_DIR=str(home / "run"))
    env.update(XDG_STATE_HOME=str(home / "state"), XDG_DATA_HOME=str(home / "data"))
    return subprocess.run(
        locod_command(*args), capture_output=True, text=True, env=env, timeout=120, cwd=home, stdin=stdin
    )


def assert_usage_error(result: subprocess.CompletedProcess[str], names: str) -> None:
    """Exit 2, and a last line naming what was wrong (argparse's after the usage, or locod's own); no
    traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    last = result.stderr.strip().splitlines()[-1]
    assert names in last, last


def test_the_sweep_reads_the_parser() -> None:
    """The sweep covers what it means to: the flags of every kind, from the parser."""
    swept = {label(p, a) for p, a in VALUED}
    assert {"--endpoint", "ask --max-tokens", "decisions of", "models pull --ctx", "feedback label"} <= swept
    assert {label(p, a) for p, a in NUMERIC} >= {
        "ask --seed",
        "ask --temperature",
        "stop --timeout",
        "models pull --max-size",
    }
    assert {label(p, a) for p, a in CHOICES} >= {"ask --force", "decisions --outcome"}


@pytest.mark.parametrize(("path", "action"), VALUED, ids=[label(p, a) for p, a in VALUED])
def test_every_value_is_refused_empty(tmp_path: Path, path: tuple[str, ...], action: argparse.Action) -> None:
    """Found: an empty value was taken for none given (`--endpoint ''` the default socket, `--secret ''`
    $LOCOD_SECRET, `models fetch ''` the embedded model, `--dir ''` the default directory), refused as a
    protocol field once the daemon was asked (`--session ''`: "field 'session' must be 1 to 200 characters",
    exit 1), or, with no daemon, matched nothing (`decisions --session ''`); each is now a usage error."""
    if action.dest == "prompt":  # an empty prompt is the request's to refuse (test_bad_input)
        return
    assert_usage_error(run_locod(tmp_path, *command_line(path, action, "")), named(action))


@pytest.mark.parametrize(("path", "action"), NUMERIC, ids=[label(p, a) for p, a in NUMERIC])
def test_every_number_is_read_from_ascii_digits(tmp_path: Path, path: tuple[str, ...], action: argparse.Action) -> None:
    """Found: Python's int() and float() read `５`, `١٢` (12) and `5_0` (50), so `--max-tokens 5_0` ran
    with 50, `--limit ３` listed 3 where `locod decisions ３` is no decision, `--max-size ３G` took 3 GiB."""
    for value in NOT_NUMBERS:
        assert_usage_error(run_locod(tmp_path, *command_line(path, action, value)), named(action))


@pytest.mark.parametrize(("path", "action"), CHOICES, ids=[label(p, a) for p, a in CHOICES])
def test_every_choice_names_the_ones_there_are(tmp_path: Path, path: tuple[str, ...], action: argparse.Action) -> None:
    """Held: a choice not offered is refused with the list of those that are."""
    for value in NOT_CHOICES:
        result = run_locod(tmp_path, *command_line(path, action, value))
        assert_usage_error(result, named(action))
        assert all(repr(choice) in result.stderr for choice in action.choices), result.stderr


def test_a_mistyped_command_or_action_is_told_the_one_meant(tmp_path: Path) -> None:
    """Found: `locod stauts` was told `locod status`, but `locod models lst`, `config shw` and `policy trian`
    got argparse's "invalid choice" and every action. At every level a near miss now names the one meant."""
    for path, parser in levels(_parser()):
        for name in _subcommands(parser):
            typo = name + name[-1]
            what = "action" if path else "command"
            prog = " ".join(["locod", *path])
            result = run_locod(tmp_path, *path, typo)
            assert_usage_error(result, f"{prog} has no {typo!r} {what}; did you mean `{prog} {name}`?")


def test_one_stop_too_many_is_a_usage_error(tmp_path: Path) -> None:
    """Found: a fifth `--stop` was refused once the command ran, exit 1 as a refused request; it is a wrong
    command line (exit 2), as an empty one already was."""
    result = run_locod(tmp_path, "ask", "hi", *["--stop", "x"] * (MAX_STOP_SEQUENCES + 1))
    assert_usage_error(result, f"argument --stop: at most {MAX_STOP_SEQUENCES} of them, got {MAX_STOP_SEQUENCES + 1}")


def json_commands() -> list[list[str]]:
    """Every command that takes --json, with what it needs besides."""
    return [
        [*path, *(["--max-tokens", "2", "hi"] if path == ("ask",) else []), "--json"]
        for path, parser in levels(_parser())
        if any("--json" in action.option_strings for action in parser._actions)
    ]


def json_documents(stdout: str, words: list[str]) -> list[dict[str, object] | list[object]]:
    """What a --json command printed: `ask` a frame a line, every other one JSON document."""
    if words[0] == "ask":
        return [json.loads(line) for line in stdout.splitlines()]
    return [json.loads(stdout)]


@pytest.mark.parametrize("words", json_commands(), ids=" ".join)
def test_every_json_command_prints_json_when_no_daemon_answers(tmp_path: Path, words: list[str]) -> None:
    """Held: at an endpoint nobody serves, each --json command prints JSON: what it can say without the
    daemon (the config, the log, the models), else one error object beside its line on stderr."""
    result = run_locod(tmp_path, "--endpoint", f"tcp://127.0.0.1:{free_port()}", *words)
    assert "Traceback" not in result.stderr, result.stderr
    documents = json_documents(result.stdout, words)
    if result.returncode:
        assert documents[-1] == {**documents[-1], "type": "error", "code": "not_running"}, result.stdout
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("words", json_commands(), ids=" ".join)
def test_every_command_to_a_reader_that_left_ends_quietly(daemon: DaemonHandle, words: list[str]) -> None:
    """Held: `locod decisions | head -1` and the like, with the reader gone before the first line: the status
    of a command SIGPIPE ended, nothing on stderr. Each --json command, with and without --json; then JSON."""
    for line in (words, words[:-1]):
        read, write = os.pipe()
        os.close(read)
        with os.fdopen(write, "w") as gone:
            result = subprocess.run(
                locod_command("--config", str(daemon.config_path), *line),
                stdout=gone,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                text=True,
                env=daemon.env,
                timeout=120,
            )
        assert result.returncode == 141, (line, result.returncode, result.stderr)
        assert "Traceback" not in result.stderr and "Broken pipe" not in result.stderr, result.stderr
    answered = daemon.cli(*words)
    assert answered.returncode == 0, answered.stderr
    assert json_documents(answered.stdout, words)


@pytest.mark.parametrize("words", json_commands(), ids=" ".join)
def test_a_wrong_json_command_line_prints_its_error_as_json(tmp_path: Path, words: list[str]) -> None:
    """Found: a --json command line argparse refused (`locod decisions --json --limit 0`) printed nothing on
    stdout, where every other failure of a --json command prints its error object: a script piping it to jq
    read empty input. It prints the object now (kind config, code usage), and stderr says it as before."""
    wrong = run_locod(tmp_path, *words, "--no-such-flag")
    assert_usage_error(wrong, "no such option: --no-such-flag")
    said = wrong.stderr.strip().splitlines()[-1].replace(": error: ", ": ", 1)
    expected = {"type": "error", "kind": "config", "code": "usage", "message": said, "decision": None}
    assert json.loads(wrong.stdout) == expected, wrong.stdout
    plain = run_locod(tmp_path, *words[:-1], "--no-such-flag")
    assert_usage_error(plain, "no such option: --no-such-flag")
    assert plain.stdout == ""  # without --json, stdout stays empty


def test_json_after_double_dash_is_a_word_of_the_prompt(tmp_path: Path) -> None:
    """`--` ends the options: a `--json` after it is the prompt's, so a wrong command line is said on stderr
    alone."""
    wrong = run_locod(tmp_path, "ask", "--max-tokens", "0", "--", "--json")
    assert_usage_error(wrong, "argument --max-tokens")
    assert wrong.stdout == ""


def flags_of_their_own() -> list[tuple[tuple[str, ...], str]]:
    """(command, flag) for each flag without a value that a command takes and locod's own level does not."""
    return [
        (path, action.option_strings[-1])
        for path, parser in levels(_parser())
        if path and not _subcommands(parser)
        for action in parser._actions
        if action.nargs == 0 and action.option_strings and not set(action.option_strings) & global_flags()
    ]


@pytest.mark.parametrize(
    ("path", "flag"), flags_of_their_own(), ids=[" ".join((*p, f)) for p, f in flags_of_their_own()]
)
def test_a_command_s_flag_before_it_is_told_where_it_goes(tmp_path: Path, path: tuple[str, ...], flag: str) -> None:
    """Found: `locod --json status` said "no such option: --json (did you mean --json?)". The command's own
    flag given before it is told where it goes."""
    result = run_locod(tmp_path, flag, *path)
    assert_usage_error(result, f"{flag} goes after the command: `locod {' '.join(path)} {flag}`")


OWN_VALUED = [(p, a) for p, a in VALUED if p and a.option_strings]


@pytest.mark.parametrize(("path", "action"), OWN_VALUED, ids=[label(p, a) for p, a in OWN_VALUED])
def test_a_command_s_valued_flag_before_it_is_told_where_it_goes(
    tmp_path: Path, path: tuple[str, ...], action: argparse.Action
) -> None:
    """Found: `locod --limit 5 decisions` was "invalid choice: '5'" and the list of commands (argparse took the
    value for the command). The flag is told the commands it belongs to, this one among them."""
    flag = action.option_strings[-1]
    result = run_locod(tmp_path, flag, "3", *path)
    assert_usage_error(result, f"{flag} goes after the command: ")
    assert f"`locod {' '.join(path)} {flag}`" in result.stderr, result.stderr
