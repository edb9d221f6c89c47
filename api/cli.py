"""The ``locod`` command line: its parser (the global options every command takes) and the exit status of
each error; the commands themselves are in ``locod.commands``, over what they share (``commands.common``: the
configuration, the socket), a thin layer over ``locod.client`` and the daemon's entry.

Exit codes: EXIT_STATUS below (also `locod --help`, README.md). Every error is one line.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from locod import __version__
from locod.commands.common import CONFIG_PLACES, error_json
from locod.commands.control import cmd_reload, cmd_serve, cmd_stop
from locod.commands.decisions import cmd_decisions, cmd_feedback
from locod.commands.offline import (
    cmd_config_show,
    cmd_models_fetch,
    cmd_models_list,
    cmd_models_pull,
    cmd_models_rm,
    cmd_policy_train,
    cmd_report,
)
from locod.commands.status import RESTART, cmd_status
from locod.commands.turns import CHAT_KEYS, cmd_ask, cmd_chat
from locod.errors import (
    Busy,
    CloudError,
    ConfigError,
    DaemonNotRunning,
    LocodError,
    ModelError,
    RequestError,
    StorageError,
)
from locod.protocol import (
    LOCATIONS,
    MAX_ID_CHARS,
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    OPTION_RULES,
    OUTCOMES,
    option_problem,
)
from locod.terminal import shown
from locod.words import ascii_number, closest

EXIT_CODES: dict[type[LocodError], int] = {
    ConfigError: 2,
    ModelError: 3,
    StorageError: 4,
    DaemonNotRunning: 5,
    Busy: 6,
    CloudError: 7,
}
EXIT_STATUS = """exit status (for scripts; the message is one line on stderr, and with --json also one JSON
object on stdout, {"type": "error", "kind": ..., "code": ..., "message": ...}, code as in locod.errors):
  0    done
  1    the request was refused or failed: change it (an unknown model, an unreadable file, an empty prompt)
  2    a wrong command line, or an invalid configuration
  3    a local model is missing or cannot be loaded
  4    the decision log or a state directory cannot be used
  5    no daemon answers at the endpoint (not started, still loading its models, or stopped)
  6    busy: at a queue limit, shutting down, the turn was cancelled, or its model removed by a reload; try again
  7    the cloud failed and no local answer could stand in
  130, 143, 141  stopped by SIGINT (Ctrl-C), SIGTERM (`timeout`), or a reader that left (`| head`)"""


def main(argv: list[str] | None = None) -> int:
    _standard_streams()
    _no_writes_by_others()
    parser = _parser()
    argv = _help_as_an_option(sys.argv[1:] if argv is None else argv, parser)
    try:
        args = _parsed(argv, parser)
    except _Wrong as wrong:
        return wrong.said(_asks_json(argv))
    args.set = (args.set or []) + getattr(args, "set_after", [])
    _say_what_set_cannot_do(args)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, not at exit, so that a reader who left (`| head`) is handled below
        return code
    except LocodError as exc:
        if getattr(args, "json", False):  # a script reading stdout gets why, not empty input
            print(error_json(exc), flush=True)
        record = "" if exc.decision is None else f" (the turn's record: `locod decisions {exc.decision}`)"
        print(shown(f"locod: {exc.message}{record}"), file=sys.stderr)
        return next((code for cls, code in EXIT_CODES.items() if isinstance(exc, cls)), 1)
    except BrokenPipeError:  # `locod ... | head`: the reader left. Before OSError, whose subclass it is.
        # Quiet, with the status of a command that SIGPIPE ended; stdout goes to /dev/null so that the
        # interpreter's own flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as exc:  # a file named on the command line (missing, a directory, unreadable), or the output
        where = f"{exc.filename}: " if exc.filename else "writing the output: " if exc.errno == errno.ENOSPC else ""
        print(f"locod: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parsed(argv: list[str], parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The command line read, or ``_Wrong`` raised with what is wrong in it."""
    mistake = _mistyped(argv, parser)
    if mistake:
        mistake[0].error(mistake[1])
    args, extra = _prompt_words(*parser.parse_known_args(argv))
    if extra and args.func is not cmd_policy_train:  # only training passes its own options through
        args.command_parser.error(_unrecognized(extra, args))
    args.train_args = extra
    return args


class _Wrong(SystemExit):
    """A wrong command line: argparse's exit with status 2, carrying what is wrong so that main says it, and to
    a ``--json`` command line as its error object on stdout too, as every other failure of one is (a script
    reading ``locod decisions --json --limit 0`` got empty input)."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(2)
        self.parser, self.message = parser, message

    def said(self, as_json: bool) -> int:
        if as_json:
            print(error_json(ConfigError(f"{self.parser.prog}: {self.message}", code="usage")), flush=True)
        self.parser.print_usage(sys.stderr)
        print(f"{self.parser.prog}: error: {self.message}", file=sys.stderr)
        return 2


class _Parser(argparse.ArgumentParser):
    """locod's parsers (its commands' too: ``add_subparsers`` makes them of their parent's class): a usage
    error raises ``_Wrong``, which main says; a flag that holds one value takes it once (``_Once``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in (None, "store"):
            self.register("action", name, _Once)

    def error(self, message: str) -> NoReturn:
        raise _Wrong(self, message)


class _Once(argparse._StoreAction):
    """A flag that holds one value, given twice (``locod ask --model a --model b``): argparse kept the last
    without a word, so a command line built from pieces asked another model than the one its author saw."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option: Any = None) -> None:
        given = namespace.__dict__.setdefault("given_flags", set())
        if self.dest in given:
            raise argparse.ArgumentError(self, "given twice: give it once")
        given.add(self.dest)
        super().__call__(parser, namespace, values, option)


def _asks_json(argv: list[str]) -> bool:
    """Whether the command line has ``--json``, as a command reads it: before ``--``, after which it is a
    word of the prompt."""
    return "--json" in (argv[: argv.index("--")] if "--" in argv else argv)


def _standard_streams() -> None:
    """A closed standard stream (``locod ask <&-``, a job started with none) is /dev/null: Python makes it
    None, and the first read or flush ended in a traceback. What the output's encoding cannot hold prints as
    escapes (``\\u2603``): in a Latin-1 or ASCII locale, an answer's first emoji stopped ``locod ask``."""
    for name, mode in (("stdin", "r"), ("stdout", "w"), ("stderr", "w")):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, mode))  # noqa: SIM115 (for the process's life, as the real one)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def _no_writes_by_others() -> None:
    """Nothing locod writes (a fetched or pulled model, ``pulled.toml``, a report) is writable by group or
    others, whatever the umask it inherits: under ``umask 000`` (a container's shell, a CI runner) `locod models
    fetch` made the models directory 0777 and the GGUF 0666, so any local user could swap the weights the daemon
    loads. The daemon itself narrows it further, to 077 (server.py)."""
    os.umask(os.umask(0o022) | 0o022)


# Commands of other local-LLM tools (Ollama's above all) that people type from habit, and locod's own for them:
# argparse alone would answer "invalid choice" with the list of commands, leaving the mapping to guess.
HABITS = {
    word: f"locod has no {word!r} command; {meaning}"
    for word, meaning in (
        ("run", "for a chat use `locod chat` (or `locod ask PROMPT`), with `--model NAME` to pick a model"),
        ("list", "the models are listed by `locod models list`"),
        ("ls", "the models are listed by `locod models list`"),
        ("ps", "`locod status` shows the loaded models and the turns in flight"),
        ("pull", "models are downloaded by `locod models pull SOURCE`"),
        ("rm", "models are removed by `locod models rm NAME`"),
        ("show", "`locod models list` shows each model's size and context, `locod config show` the configuration"),
        ("start", "`locod serve` runs the daemon (scripts/install.sh installs it as a service)"),
        ("restart", f"restart the daemon with {RESTART}"),
        ("explain", "`locod decisions ID` shows one turn: where it ran and why"),
        ("why", "`locod decisions ID` shows one turn: where it ran and why"),
        (
            "logs",
            "a service logs to the journal (`journalctl --user -u locod`, or `-u locod` for the system one); "
            "scripts/quickstart.sh's daemon to daemon.log beside its decision log (`locod status` names it)",
        ),
    )
}
# `ollama stop MODEL` unloads a model; `locod stop` stops the daemon, and locod unloads models itself.
STOP_TAKES_NO_MODEL = (
    "`locod stop` stops the daemon and takes no model: locod loads a model when a turn needs it and unloads the "
    "least recently used to stay within local.memory_budget_mb; `--model NAME` on `ask` or `chat` answers with "
    "another, and a model removed from the configuration is unloaded by `locod reload`"
)
# The longest `locod stop --timeout`: a daemon still stopping after a day is stuck (its own wait for the turns
# in flight is daemon.shutdown_grace_s), and the command says so rather than wait for good.
MAX_STOP_WAIT_S = 86400.0
GLOBAL_VALUED = ("--config", "--set", "--endpoint", "--secret", "--secret-file")


def _command_at(argv: list[str]) -> int | None:
    """Where the command is in a command line: its first word that is neither an option nor a global option's
    value."""
    after_value = False
    for at, word in enumerate(argv):
        if after_value:
            after_value = False
        elif word in GLOBAL_VALUED:
            after_value = True
        elif not word.startswith("-"):
            return at
    return None


def _help_as_an_option(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``locod help ask`` is ``locod ask --help`` and ``locod help`` is ``locod --help``, as git's and pip's
    ``help`` are: argparse alone refused the first thing many users type as "invalid choice: 'help'". So at
    every level: ``locod models help`` is ``locod models --help``, ``locod models help pull`` ``locod models
    pull --help`` (the actions of ``config``, ``models`` and ``policy`` refused it as their invalid choice)."""
    for at, _ in _levels(argv, parser):
        if argv[at] == "help":
            return [*argv[:at], *argv[at + 1 :], "--help"]
    return argv


def _levels(argv: list[str], parser: argparse.ArgumentParser) -> Iterator[tuple[int, argparse.ArgumentParser]]:
    """Where each level's command word is in a command line, with the parser that reads it: for ``locod models
    pull URL``, the place of ``models`` with locod's parser, then that of ``pull`` with models'. A command
    without actions ends it: ``locod ask help`` asks "help"."""
    start = 0
    while (at := _command_at(argv[start:])) is not None:
        at += start
        yield at, parser
        below = _subcommands(parser).get(argv[at])
        if below is None or not _subcommands(below):
            return
        parser, start = below, at + 1


def _mistyped(argv: list[str], parser: argparse.ArgumentParser) -> tuple[argparse.ArgumentParser, str] | None:
    """A command or action the command line names that locod lacks, with the parser that says so and what was
    likely meant: another tool's habit (``locod ps``), a typo at any level (``locod models lst``), or a valued
    option given before its command or action (``locod models --dir D fetch``)."""
    for at, level in _levels(argv, parser):
        mistake = (HABITS.get(argv[at]) if level is parser else None) or _near_miss(argv[at], level)
        if not mistake and at and argv[at] not in _subcommands(level):
            mistake = _misplaced(argv[at - 1], level)
        if mistake:
            return level, mistake
    return None


def _misplaced(flag: str, parser: argparse.ArgumentParser) -> str | None:
    """A command's valued option given before the command (``locod --limit 5 decisions``), whose value argparse
    took for the command and refused as "invalid choice: '5'": the commands it belongs to. Not a flag without a
    value: in ``locod --json frobnicate`` the word after it is the unknown command, and was told it was --json's
    place that was wrong."""
    owners = [
        f"`{below.prog} {flag}`"
        for below in _all_levels(parser)
        if _takes_a_value(below, flag) and flag not in parser._option_string_actions
    ]
    return f"{flag} goes after the command: {' or '.join(owners)}" if owners else None


def _takes_a_value(parser: argparse.ArgumentParser, flag: str) -> bool:
    """Whether ``flag`` is an option of ``parser`` that reads the word after it."""
    action = parser._option_string_actions.get(flag)
    return action is not None and action.nargs != 0


def _all_levels(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every command and action under ``parser``, the groups' actions after their group."""
    for below in _subcommands(parser).values():
        yield below
        yield from _all_levels(below)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The commands (or a command's actions) ``parser`` takes, by name, as its subcommands action lists them."""
    return {
        name: below
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name, below in action.choices.items()
    }


def _prompt_words(args: argparse.Namespace, extra: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """A prompt typed without quotes is its words joined, as ``echo`` prints them: ``locod ask hi there``
    asks "hi there", ``locod ask hi --model m there`` too (argparse took the first run of words and called
    the rest unrecognized). An unknown option among them leaves them all unrecognized: it is said as one."""
    if not extra or not isinstance(getattr(args, "prompt", None), list):
        return args, extra
    if any(word.startswith("-") and word != "-" for word in extra):
        return args, extra
    args.prompt = [*args.prompt, *extra]
    return args, []


def _unrecognized(extra: list[str], args: argparse.Namespace) -> str:
    """What the command line held that its command does not take. An unknown option is named alone, with the
    options it may have meant: argparse took the value after it as the command's argument (``locod ask -m x
    hi`` asked "x" and called ``-m hi`` unrecognized; ``models pull -n NAME URL`` pulled NAME). Words where a
    command takes none say what the command does instead, where a habit may have put them (``stop MODEL``)."""
    command = args.command_parser
    unknown = [word.split("=", 1)[0] for word in extra if word.startswith("-") and word != "-"]
    if not unknown:
        meaning = getattr(args, "words_mean", None)
        return f"unrecognized arguments: {' '.join(extra)}" + (f"; {meaning}" if meaning else "")
    known = [flag for action in command._actions for flag in action.option_strings]
    early = [flag for flag in unknown if flag in known]
    if early:  # the command's own, before it (`locod --json status`): "no such option: --json (did you mean --json?)"
        goes = "goes" if len(early) == 1 else "go"
        return f"{', '.join(early)} {goes} after the command: `{command.prog} {' '.join(early)}`"
    said = [f"{flag} ({meant})" if (meant := _meant(flag, known)) else flag for flag in unknown]
    words = "; a word of the prompt that begins with - goes after --" if _takes_prompt(command) else ""
    return f"no such option: {', '.join(said)}; `{command.prog} --help` lists them{words}"


def _takes_prompt(command: argparse.ArgumentParser) -> bool:
    """Whether ``command`` reads a prompt from its words: an unknown option there may be a word of it."""
    return any(action.dest == "prompt" for action in command._actions)


def _meant(flag: str, known: list[str]) -> str | None:
    """The options an unknown ``flag`` may stand for: for a short one (``-m``), the long ones of its letter;
    else the closest in spelling (``--modle``)."""
    if len(flag) == 2:
        meant = [option for option in known if option.startswith(f"--{flag[1]}")]
    else:
        meant = [close] if (close := closest(flag, known)) else []
    return f"did you mean {' or '.join(meant)}?" if meant else None


def _near_miss(word: str, level: argparse.ArgumentParser) -> str | None:
    """A mistyped command (``locod askk``, ``locod stauts``) or action (``locod models lst``) named with the one
    it is closest to: argparse's "invalid choice" listed them all and left the user to spot which was meant."""
    commands = list(_subcommands(level))
    if word in commands:
        return None
    close = closest(word, commands)
    what = "command" if level.prog == "locod" else "action"
    return (
        f"{level.prog} has no {word!r} {what}; did you mean `{level.prog} {close}`? (`{level.prog} --help` lists them)"
        if close
        else None
    )


def _say_what_set_cannot_do(args: argparse.Namespace) -> None:
    """A command that asks the running daemon reads from the configuration only where the daemon is
    (paths, its socket): any other ``--set`` changes nothing, which must not pass silently."""
    if args.func not in (cmd_ask, cmd_chat, cmd_status, cmd_decisions, cmd_feedback, cmd_reload, cmd_stop):
        return
    ignored = [s.split("=", 1)[0] for s in args.set if not s.startswith(("paths.", "daemon."))]
    if ignored:
        print(
            f"warning: --set {', '.join(ignored)} does not change the running daemon, which keeps its own "
            "configuration: edit the config file and `locod reload`, or start it with `locod serve --set ...`",
            file=sys.stderr,
        )


def _decision_id(text: str) -> int:
    """``feedback``'s decision id, read as ``locod decisions ID`` reads one: ASCII digits alone. Python's
    ``int`` also takes ``3_0`` (30), `` 3`` and ``３``, so a slip labelled another decision, and a label is
    final; ``decisions`` calls each of them no decision."""
    if not (text.isascii() and text.isdecimal()):
        raise argparse.ArgumentTypeError(f"expects a decision id, digits as `locod decisions` shows it, got {text!r}")
    return int(text)


def _before(text: str) -> int:
    """``decisions --before``: a decision id, 1 or more and within SQLite's integers, checked as the command
    line is read (the log at rest would raise on a larger one, the daemon refuse it)."""
    before = _decision_id(text)
    if not 0 < before < 1 << 63:
        raise argparse.ArgumentTypeError(f"expects a decision id, 1 or more, got {text!r}")
    return before


def _limit(text: str) -> int:
    """``decisions --limit``: the range the daemon takes, checked before asking it (or the file)."""
    try:
        value = ascii_number(int)(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a whole number, got {text!r}") from None
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"must be between 1 and 1000, got {value}")
    return value


def _seconds(text: str) -> float:
    """``stop --timeout``: 0 to ``MAX_STOP_WAIT_S`` seconds. A negative one (or ``nan``) sent the daemon
    SIGTERM, then said at once that it was "still stopping after -1 s" and exited 1: the stop was done, the
    command said it failed; ``inf`` (or ``1e300``) waited for good on a daemon that never exits."""
    try:
        value = ascii_number(float)(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a number of seconds, got {text!r}") from None
    if not 0 <= value <= MAX_STOP_WAIT_S:
        most = f"at most {MAX_STOP_WAIT_S:g} (a day)"
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, {most}, got {text!r}")
    return value


def _since(text: str) -> str:
    """``report --since`` and ``decisions --since``: a period checked as the command line is read, so a wrong
    one is a usage error (exit 2, as every other wrong argument), not a refused request (exit 1)."""
    from locod.daemon.history import parse_since

    try:
        parse_since(text)
    except RequestError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--since ")) from None
    return text


def _session(text: str) -> str:
    """``--session``: a session id as the text the user typed. In an ASCII locale (``LC_ALL=C`` without UTF-8
    mode) Python reads each non-ASCII byte of an argument as a lone surrogate, which the daemon refused as
    "a lone UTF-16 surrogate escape": ``café`` could be neither continued nor looked up in the log."""
    try:
        return _record_key(text.encode("utf-8", "surrogateescape").decode("utf-8"))
    except UnicodeError:
        raise argparse.ArgumentTypeError("is not UTF-8 text") from None


def _record_key(text: str) -> str:
    """A session id or ``decisions ID``, in the daemon's bounds: an empty one was refused as a protocol
    field (``field 'session' must be 1 to 200 characters``, exit 1), or, with no daemon, matched nothing."""
    if not 0 < len(text) <= MAX_ID_CHARS:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_ID_CHARS} characters, got {len(text)}")
    return text


def _given(text: str) -> str:
    """A name, a path or a secret, never empty: ``--endpoint ''`` and ``--secret ''`` were taken for not given
    (the default socket, ``$LOCOD_SECRET``), ``models fetch ''`` and ``--dir ''`` for the embedded model and
    the default directory, each without a word; ``--attach ''`` was refused as the file ".", ``--model ''``
    once the daemon was asked."""
    if not text:
        raise argparse.ArgumentTypeError("is empty: leave it out for its default")
    return text


FLAG_FIRST = re.compile(r"^--[a-z0-9-]+ ")  # a rule's message names its flag, as argparse's own words will


def _rule(module: str, name: str, kind: Callable[[str], Any] = str) -> Callable[[str], Any]:
    """A flag's type from the rule that the code taking its value checks it with (``name`` in ``module``,
    imported only when the flag is given: ``locod --help`` stays quick). Checked as the command line is read,
    a wrong value is a usage error (exit 2) like a wrong ``--since``: ``models pull --max-size bogus`` and
    ``report --out x.txt`` exited 1, as a refused request."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects a whole number, got {text!r}") from None
        try:
            return getattr(importlib.import_module(module), name)(value)
        except LocodError as exc:
            raise argparse.ArgumentTypeError(FLAG_FIRST.sub("", exc.message)) from None

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="locod",
        description="Local-cloud LLM daemon for edge devices.",
        parents=[_global_options(None)],
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-V", "--version", action="version", version=f"locod {__version__}")
    sub = _Subcommands(parser.add_subparsers(required=True, metavar="COMMAND"))
    p = sub.add_parser("serve", help="run the daemon in the foreground")
    p.set_defaults(func=cmd_serve)
    _add_turn_commands(sub)
    _add_daemon_commands(sub)
    _add_offline_commands(sub)
    return parser


def _global_options(default: Any) -> argparse.ArgumentParser:
    """--config, --set, --endpoint and --secret: taken before the command and after it (``locod serve --set
    ...``). The copies after it default to ``argparse.SUPPRESS`` so that they leave what was given before the
    command alone; ``--set`` after it goes to ``set_after`` and adds to the ones before (main joins them)."""
    options = _Parser(add_help=False)
    group = options.add_argument_group("global options (before or after the command)")
    group.add_argument(
        "--config",
        default=default,
        type=_given,
        help=f"config file (default: {CONFIG_PLACES})",
    )
    group.add_argument(
        "--set",
        action="append",
        dest="set" if default is None else "set_after",
        default=default,
        metavar="SECTION.KEY=VALUE",
        help="override one config key (after the file and LOCOD_* variables); repeatable",
    )
    group.add_argument(
        "--endpoint",
        default=default,
        type=_given,
        help="daemon endpoint (default: the ipc socket in the runtime directory)",
    )
    group.add_argument(
        "--secret",
        default=default,
        type=_given,
        help="shared secret for a tcp endpoint (other users can read it in the process list: prefer --secret-file "
        "or $LOCOD_SECRET)",
    )
    group.add_argument(
        "--secret-file",
        default=default,
        type=_given,
        metavar="FILE",
        help="file holding the tcp endpoint's shared secret, readable by its owner only (chmod 600)",
    )
    return options


class _Subcommands:
    """``add_subparsers()``'s action, giving every command (and every action of ``config``, ``models`` and
    ``policy``) the global options."""

    def __init__(self, action: Any) -> None:
        self.action = action

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        parser = self.action.add_parser(name, parents=[_AFTER], **kwargs)
        parser.set_defaults(command_parser=parser)  # what says a mistake in its own usage (main)
        return parser

    def nested(self, name: str, help: str) -> _Subcommands:
        return _Subcommands(self.action.add_parser(name, help=help).add_subparsers(required=True, metavar="ACTION"))


_AFTER = _global_options(argparse.SUPPRESS)


def _add_turn_commands(sub: Any) -> None:
    """``ask`` and ``chat``."""
    for name, func, text in (
        ("ask", cmd_ask, "ask one question and stream the answer"),
        ("chat", cmd_chat, "interactive multi-turn chat"),
    ):
        # the chat's own commands (/attach, /bye) were said only once it ran, not by `locod chat --help`
        p = sub.add_parser(name, help=text, description=f"{text}; in it, {CHAT_KEYS}" if name == "chat" else None)
        if name == "ask":
            p.add_argument(
                "prompt",
                nargs="*",
                help="the question, quoted or not (its words are joined with spaces; put a word that begins with - "
                "after --); - (or none, with a pipe) reads standard input",
            )
            for flag, meaning in (
                ("--attach", "image or document to attach"),
                ("--private", "attachment that never leaves the device"),
            ):
                p.add_argument(flag, action="append", type=_given, metavar="FILE", help=f"{meaning} (repeatable)")
        p.add_argument(
            "--model", type=_given, help="answer with this configured model (`locod models list` names them)"
        )
        p.add_argument(
            "--max-tokens", type=_option("max_tokens"), help="answer length limit (default: local.max_tokens)"
        )
        if name == "ask":
            p.add_argument("--temperature", type=_option("temperature"), help="sampling temperature, 0-2")
            p.add_argument("--seed", type=_option("seed"), help="sampling seed, for a repeatable local answer")
            p.add_argument(
                "--stop",
                action=_StopTexts,
                type=_stop_text,
                metavar="TEXT",
                help=f"end the answer before TEXT (up to {MAX_STOP_SEQUENCES})",
            )
            p.add_argument("--json", action="store_true", help="print every frame as JSON")
        p.add_argument("--session", type=_session, help="session id (keeps the dialogue history)")
        p.add_argument("--force", choices=("local", "cloud"), help="skip routing")
        p.add_argument("-v", "--verbose", action="store_true", help="show where and why each turn ran")
        p.set_defaults(func=func)


def _option(name: str) -> Callable[[str], Any]:
    """A flag's type for the chat option ``name``: the socket's own rule (protocol.option_problem), said as
    argparse says a bad flag (``argument --temperature: must be ...``), not as a protocol field."""
    kind = OPTION_RULES[name][0]

    def parse(text: str) -> Any:
        try:
            value = ascii_number(kind)(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expects {'a whole' if kind is int else 'a'} number, got {text!r}"
            ) from None
        problem = option_problem(name, value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


def _stop_text(text: str) -> str:
    """A ``--stop`` flag's value, by the socket's bounds for one sequence (options.stop)."""
    if not text or len(text) > MAX_STOP_CHARS:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_STOP_CHARS} characters, got {len(text)}")
    return text


class _StopTexts(argparse._AppendAction):
    """``--stop``, repeatable up to the socket's bound (options.stop): a fifth was refused once the command ran,
    exit 1 as a refused request, not 2 as the wrong command line it is."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option: Any = None) -> None:
        super().__call__(parser, namespace, values, option)
        given = len(getattr(namespace, self.dest))
        if given > MAX_STOP_SEQUENCES:
            raise argparse.ArgumentError(self, f"at most {MAX_STOP_SEQUENCES} of them, got {given}")


def _add_daemon_commands(sub: Any) -> None:
    """What asks a running daemon: ``status``, ``decisions`` (the file itself when none runs), ``feedback``,
    ``reload``, ``stop``."""
    p = sub.add_parser("status", help="device, network, routing and queue state")
    p.add_argument("--json", action="store_true", help="the whole status as JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("decisions", help="recent decision records")
    p.add_argument(
        "of",
        nargs="?",
        type=_record_key,
        metavar="ID",
        help="only this decision: its id (`x-locod-decision`, `locod ask -v`) or its request id (an HTTP "
        "completion's `id`, chatcmpl-...)",
    )
    p.add_argument("--limit", type=_limit, default=20, help="how many of the newest, 1-1000 (default 20)")
    p.add_argument("--session", type=_session, help="only this session's turns (the `session` column)")
    p.add_argument("--location", choices=LOCATIONS, help="only turns answered there in the end")
    p.add_argument("--outcome", choices=OUTCOMES, help="only turns that ended so")
    p.add_argument("--since", type=_since, help="only turns of the last 30m, 12h, 7d, 4w ...")
    p.add_argument(
        "--before",
        type=_before,
        metavar="ID",
        help="only records older than decision ID: the page before one (a full page says its command on stderr)",
    )
    p.add_argument("--json", action="store_true", help="whole records as JSON, one array")
    p.set_defaults(func=cmd_decisions)

    p = sub.add_parser("feedback", help="label a decision's answer good or bad (trains the router)")
    p.add_argument("decision", type=_decision_id, help="the decision id (`locod ask -v` and `locod decisions` show it)")
    # any case: `feedback 5 Good` was refused for its capital letter alone
    p.add_argument(
        "label", type=str.lower, choices=("good", "bad"), help="whether the answer was good; a label is final"
    )
    p.set_defaults(func=cmd_feedback)

    p = sub.add_parser("reload", help="re-read the configuration and the policy")
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("stop", help="stop the daemon (as SIGTERM: turns in flight finish first)")
    p.add_argument(
        "--timeout", type=_seconds, default=60.0, help="seconds to wait for it to exit, at most a day (default 60)"
    )
    p.set_defaults(func=cmd_stop, words_mean=STOP_TAKES_NO_MODEL)


PULL = "locod.daemon.pull"  # the rules of `models pull`'s flags


def _add_offline_commands(sub: Any) -> None:
    """What works without a daemon: ``config``, ``models``, ``report``, ``policy``."""
    config = sub.nested("config", help="configuration")
    p = config.add_parser("show", help="print the running daemon's effective configuration (no secrets)")
    p.add_argument("--json", action="store_true", help="JSON instead of TOML")
    p.add_argument("--new", action="store_true", help="what a daemon started now would use, not the running one's")
    p.set_defaults(func=cmd_config_show)

    models = sub.nested("models", help="local models")
    p = models.add_parser("fetch", help="download and verify a model of the manifest")
    p.add_argument("name", nargs="?", type=_given, help="a model of models/manifest.toml (default: the embedded one)")
    p.add_argument("--dir", type=_given, help="models directory (default: paths.models_dir)")
    p.set_defaults(func=cmd_models_fetch)
    p = models.add_parser("pull", help="download a GGUF (URL or hf://owner/repo/file.gguf) and register it")
    p.add_argument("source", type=_given, help="an http(s) URL of a .gguf, or hf://owner/repo/file.gguf")
    p.add_argument(
        "--name",
        type=_rule(PULL, "model_name"),
        help="the model's name (default: the file's name in lower case, without .gguf)",
    )
    p.add_argument(
        "--sha256",
        type=_rule(PULL, "sha256_given"),
        help="expected SHA-256 (the hub's published one is checked anyway)",
    )
    p.add_argument(
        "--ctx",
        type=_rule(PULL, "context_size", ascii_number(int)),
        help="context size to load it with (default: its trained context, at most 4096)",
    )
    p.add_argument(
        "--max-size",
        type=_rule(PULL, "parse_size"),
        help="the largest file to accept, e.g. 80G (default 64G, at most 2T): a download stops there",
    )
    p.set_defaults(func=cmd_models_pull)
    p = models.add_parser("list", help="local models: size, quantisation, context, loaded, path")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(func=cmd_models_list)
    p = models.add_parser("rm", help="remove a pulled model and its file")
    p.add_argument("name", type=_given, help="the model's name, as `locod models list` shows it")
    p.set_defaults(func=cmd_models_rm)

    p = sub.add_parser("report", help="charts of what the router did, from the decision log")
    p.add_argument("--since", type=_since, default="7d", help="how far back: 30m, 12h, 7d, 4w (default 7d)")
    p.add_argument(
        "--out",
        type=_rule("locod.report", "report_file"),
        default="report.png",
        help="report.png or report.html (default report.png)",
    )
    p.set_defaults(func=cmd_report)

    policy = sub.nested("policy", help="the TMO routing policy")
    p = policy.add_parser(
        "train", help="train with RC-PPO and export ONNX (`locod policy train --help` for its options)", add_help=False
    )
    p.set_defaults(func=cmd_policy_train)  # its options are the trainer's own: main() passes them through


if __name__ == "__main__":
    sys.exit(main())
