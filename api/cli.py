"""The ``locod`` command: a thin layer over ``locod.client`` (talking to the daemon) and the daemon's entry.

Exit codes: EXIT_STATUS below (also `locod --help`, README.md). Every error is one line.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shlex
import signal
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from locod import __version__
from locod.build import code_digest
from locod.errors import (
    Busy,
    CloudError,
    ConfigError,
    DaemonNotRunning,
    LocodError,
    ModelError,
    RequestError,
    StorageError,
    UnknownDecision,
    UnknownModel,
    UnsafeSocket,
)
from locod.explain import explain, power_and_network
from locod.protocol import (
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    NO_CONFIG_FILE,
    OPTION_RULES,
    Attachment,
    DecisionFrame,
    DeltaFrame,
    DoneFrame,
    ErrorFrame,
    EscalatedFrame,
    FallbackFrame,
    Frame,
    QueuedFrame,
    option_problem,
)
from locod.terminal import for_stream, shown
from locod.words import counted, dollars

if TYPE_CHECKING:  # imported when a command talks to the daemon (pyzmq): `locod --help` stays quick
    from locod.client import Client

EXIT_CODES: dict[type[LocodError], int] = {
    ConfigError: 2,
    ModelError: 3,
    StorageError: 4,
    DaemonNotRunning: 5,
    Busy: 6,
    CloudError: 7,
}
EXIT_STATUS = """exit status (for scripts; the message is one line on stderr):
  0    done
  1    the request was refused or failed: change it (an unknown model, an unreadable file, an empty prompt)
  2    a wrong command line, or an invalid configuration
  3    a local model is missing or cannot be loaded
  4    the decision log or a state directory cannot be used
  5    no daemon answers at the endpoint (not started, still loading its models, or stopped)
  6    busy: at a queue limit, shutting down, or the turn was cancelled; try again shortly
  7    the cloud failed and no local answer could stand in
  130, 143, 141  stopped by SIGINT (Ctrl-C), SIGTERM (`timeout`), or a reader that left (`| head`)"""
SYSTEM_STATE_DIR = Path("/var/lib/locod")  # the system unit's StateDirectory


def main(argv: list[str] | None = None) -> int:
    _standard_streams()
    parser = _parser()
    habit = HABITS.get(_command_word(sys.argv[1:] if argv is None else argv) or "")
    if habit:
        parser.error(habit)
    args, extra = parser.parse_known_args(argv)
    if extra and args.func is not cmd_policy_train:  # only training passes its own options through
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.train_args = extra
    args.set = (args.set or []) + getattr(args, "set_after", [])
    _say_what_set_cannot_do(args)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, not at exit, so that a reader who left (`| head`) is handled below
        return code
    except LocodError as exc:
        print(shown(f"locod: {exc.message}"), file=sys.stderr)
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
    )
}
GLOBAL_VALUED = ("--config", "--set", "--endpoint", "--secret", "--secret-file")


def _command_word(argv: list[str]) -> str | None:
    """The command a command line names: its first word that is neither an option nor a global option's value."""
    words = iter(argv)
    for word in words:
        if word in GLOBAL_VALUED:
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    out = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _config(args: argparse.Namespace) -> Any:
    from locod.daemon.config import load_config

    return load_config(args.config, overrides=_overrides(args))


def _client(args: argparse.Namespace, warn: bool = True) -> Any:
    from locod.client import Client, locate

    try:
        return Client(args.endpoint or locate(_endpoint(args, warn)), secret=_secret(args))
    except UnsafeSocket as exc:
        raise UnsafeSocket(exc.message + _tcp_door(args), code=exc.code) from None


def _tcp_door(args: argparse.Namespace) -> str:
    """The tcp endpoint the config names, for a user the ipc socket is not open to: on a shared machine the
    admin opens it to the others in /etc/locod/config.toml, which their `locod` reads too. Named, not
    connected to on its own: a port nobody serves can be taken by any local user."""
    try:
        tcp = "" if args.endpoint else _config(args).daemon.tcp
    except ConfigError:
        return ""
    return f"; the config opens {tcp} (daemon.tcp): `locod --endpoint {tcp} ...`" if tcp else ""


def _secret(args: argparse.Namespace) -> str | None:
    """The tcp endpoint's secret: from ``--secret-file`` (owner-only, as the daemon's own), else ``--secret``
    (which every user of the machine can read in the process list), else ``$LOCOD_SECRET``."""
    if args.secret_file and args.secret:
        raise ConfigError("give the tcp secret once: --secret-file or --secret, not both")
    if args.secret_file:
        from locod.daemon.keyfile import read_key_file

        return read_key_file(args.secret_file, "--secret-file")
    return args.secret or os.environ.get("LOCOD_SECRET") or None


def _endpoint(args: argparse.Namespace, warn: bool = True) -> str:
    """The daemon's socket from the config. A config file that does not load must not cut a user off from
    a daemon that runs (perhaps with an older, valid one), nor be reported as "not running": then the
    socket its ``paths.runtime_dir`` names (read on its own) or the default one, if a daemon answers there;
    else the config's error, which is what the user has to fix."""
    from locod.client import check_alive, locate
    from locod.daemon.config import find_config_file, runtime_dir_leniently

    try:
        return str(_config(args).ipc_endpoint)
    except ConfigError as exc:
        problem = exc
    try:
        path = Path(args.config) if args.config else find_config_file(os.environ)
    except ConfigError:
        path = None
    endpoint = locate(f"ipc://{runtime_dir_leniently(path, os.environ, _overrides(args))}/locod.sock")
    try:
        check_alive(endpoint)
    except DaemonNotRunning:
        raise ConfigError(
            f"{problem.message}; no daemon answers at {endpoint[6:]}, where the socket would be: fix the config "
            "file, or pass --endpoint"
        ) from None
    if warn:
        print(shown(f"locod: warning: {problem.message}; using the daemon at {endpoint[6:]}"), file=sys.stderr)
    return endpoint


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


# -- commands -----------------------------------------------------------------------------------------


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


def cmd_serve(args: argparse.Namespace) -> int:
    # SIGHUP's default ends the process: one sent while the daemon starts (a reload asked for as it loads its
    # model) killed it. Held back until the serving loop takes it (Daemon._install_signals), it reloads then.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    from locod.daemon.logs import configure_logging
    from locod.daemon.server import Daemon

    config = _config(args)
    configure_logging(config.log.level)
    daemon = Daemon(config, args.config, _overrides(args))
    try:
        daemon.start()
        return daemon.serve_forever()
    finally:
        daemon.close()


def cmd_ask(args: argparse.Namespace) -> int:
    """``ask``; with ``--json`` an error ends the frame stream on stdout too, as an ``error`` frame, so that a
    script reading the stream with ``jq`` sees why it stopped (the one line on stderr stays)."""
    try:
        return _ask(args)
    except LocodError as exc:
        if args.json:
            frame = ErrorFrame.of(exc)
            print(json.dumps({"type": frame.type, **vars(frame)}), flush=True)
        raise


def _ask(args: argparse.Namespace) -> int:
    if args.stop and len(args.stop) > MAX_STOP_SEQUENCES:
        raise RequestError(f"argument --stop: at most {MAX_STOP_SEQUENCES} of them, got {len(args.stop)}")
    with _client(args) as client:
        named = [(p, False) for p in args.attach or []] + [(p, True) for p in args.private or []]
        frames = client.chat(
            _prompt(args.prompt),
            session=args.session,
            model=args.model,
            attachments=_turn_files(client, named),
            force=args.force,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            seed=args.seed,
            queued=True,
            stop=args.stop,
        )
        return _stream(frames, args.json, args.verbose, client)


def _turn_files(client: Any, named: list[tuple[str, bool]]) -> list[Attachment]:
    """The files of one turn, each ``(path, private)``, read and checked against the daemon's byte limit
    before anything is sent. Records and notices tell a turn's files apart by name: two notes.md from two
    folders go by their paths."""
    from locod.client import attachment

    limit = client.daemon_config()["attachments"]["max_bytes"] if named else 0
    names = Counter(Path(p).name for p, _ in named)
    return [
        attachment(p, private=private, max_bytes=limit, name=p if names[Path(p).name] > 1 else None)
        for p, private in named
    ]


def _prompt(given: str | None) -> str:
    """The prompt as given, or read from standard input for ``-`` or when it is a pipe."""
    if given is not None and given != "-":
        return _utf8(given, "the command line")
    if given is None and sys.stdin.isatty():
        raise LocodError('ask needs a prompt: `locod ask "question"`, or `-` to read it from standard input')
    text = sys.stdin.read().strip()
    if not text:
        raise RequestError("the prompt read from standard input is empty")
    return _utf8(text, "standard input")


UNDECODED_BYTE = re.compile("[\udc80-\udcff]")  # how Python's surrogateescape reads a byte that is not UTF-8


def _utf8(text: str, where: str) -> str:
    """``text`` when it is UTF-8; Python reads undecodable bytes (a Latin-1 file, a binary) as lone
    surrogates, which the daemon refuses in words about UTF-16 that do not say what the user gave."""
    bad = UNDECODED_BYTE.search(text)
    if bad is None:
        return text
    byte = ord(bad.group()) - 0xDC00
    raise RequestError(
        f"the prompt on {where} is not UTF-8 text (byte 0x{byte:02x} at character {bad.start()}); convert it first, "
        "e.g. `iconv -f latin1 -t utf-8`"
    )


def _stream(frames: Iterator[Frame], as_json: bool, verbose: bool, client: Client) -> int:
    """Print a turn: the answer on stdout; on stderr whatever the user should know (always: a notice that
    the answer did not come from where they asked, or without something they gave; a fallback), and with
    ``verbose`` where and why it ran (for a local answer that could have escalated, read from its record once
    the turn is done: no frame says why it was kept)."""
    streamed, done = False, None
    for frame in _cut_off(frames):
        if as_json:
            print(json.dumps({"type": frame.type, **vars(frame)}))
        elif isinstance(frame, DeltaFrame):
            streamed = True
            print(for_stream(frame.text, sys.stdout), end="", flush=True)
        elif isinstance(frame, QueuedFrame):
            if verbose:
                print(f"[waiting for the local model: {frame.ahead} turn(s) ahead]", file=sys.stderr)
        elif isinstance(frame, DecisionFrame):
            _say_decision(frame, verbose)
        elif isinstance(frame, FallbackFrame | EscalatedFrame):
            restart = "; what was shown above is discarded" if streamed else ""
            print(f"{chr(10) if streamed else ''}[{shown(frame.message)}{restart}]", file=sys.stderr)
        elif isinstance(frame, DoneFrame):
            done = frame
            print(flush=True)  # before any stderr line, also when stdout is a pipe
            if verbose:
                estimate = " (estimated)" if frame.cost_estimated else ""
                line = (
                    f"[decision {frame.decision}: {frame.outcome} via {frame.location} {frame.model}, "
                    f"{counted(frame.tokens_out, 'token')}, {frame.latency_ms:.0f} ms, ${frame.cost_usd:.5f}{estimate}]"
                )
                print(shown(line), file=sys.stderr)
    if verbose and done is not None and (done.outcome, done.location) == ("ok", "local"):
        _say_why_kept(client, done.decision)
    return 0


def _say_why_kept(client: Client, decision: int) -> None:
    """Why a local answer that was judged by its own confidence was shown rather than escalated."""
    try:
        (record,) = client.decisions(1, str(decision))
        clouds = {model["name"] for model in client.daemon_config()["cloud"]["models"]}
    except (LocodError, ValueError):  # a tcp client without the secret may not read records: -v says less
        return
    judged = record.get("confidence")
    if not judged or not judged.get("kept"):
        return
    print(
        f"[the local answer was shown: {judged['s_answered']:.0%} likely good after reading its confidence "
        f"({judged['s_prompt']:.0%} from the prompt alone); {_why_kept(record, judged, clouds)}; `locod decisions "
        f"{decision}` says more]",
        file=sys.stderr,
    )


def _why_kept(record: dict[str, Any], judged: dict[str, Any], clouds: set[str]) -> str:
    """Why the checkpoint kept the local answer: an exploration, a cloud (one of ``clouds``) not predicted to
    do better, or one that was but not by enough for its cost (a sure local answer beats it outright)."""
    if judged.get("explored"):
        return "an exploration turn kept it"
    s_hat = record.get("s_hat") or {}
    cloud = max((s for key, s in s_hat.items() if key.partition("|")[0] in clouds), default=None)
    if cloud is None or cloud <= judged["s_answered"]:
        return "the cloud was not predicted to do better" + ("" if cloud is None else f" ({cloud:.0%})")
    return f"the cloud's better chance ({cloud:.0%}) was not worth its cost at the current SLA and queue"


def _cut_off(frames: Iterator[Frame]) -> Iterator[Frame]:
    """The turn's frames; a daemon gone after the turn began is said as an answer cut off (on a line of its
    own), not as a daemon that was never there."""
    started = shown = False
    try:
        for frame in frames:
            started, shown = True, shown or isinstance(frame, DeltaFrame)
            yield frame
    except DaemonNotRunning as exc:
        if not started:
            raise
        if shown:
            print(flush=True)
        raise DaemonNotRunning(f"the answer was cut off: the daemon stopped during the turn ({exc.message})") from None


def _say_decision(frame: DecisionFrame, verbose: bool) -> None:
    if verbose:
        sent = ", ".join(frame.attachments_sent) or "none"
        line = f"[{frame.location}: {frame.model}; uploaded to the cloud: {sent}; {frame.reason}]"
        print(shown(line), file=sys.stderr)
    elif frame.notice:
        print(shown(f"[{frame.notice}]"), file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> int:
    """Multi-turn chat. Ctrl-C stops the answer being written and returns to the prompt (the daemon
    cancels the turn and records it so); Ctrl-D, an empty line or ``/bye`` leaves."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    session = args.session or f"chat-{uuid.uuid4().hex[:8]}"
    client = _client(args)  # a stopped daemon is said before the user types a first question
    if args.model is not None:  # and a model it does not have, rather than at every turn
        try:
            _check_model_offered(args.model, client.status())
        except LocodError:
            client.close()
            raise
    print(f"locod chat, session {session}. {CHAT_KEYS}", file=sys.stderr)
    typed = sys.stdin.isatty()  # a dialogue piped in gets its answers alone on stdout, no "> " before each
    pending: list[tuple[str, bool]] = []  # (path, private): the files /attach and /private add to the next question
    try:
        while True:
            try:
                line = input("> " if typed else "")
            except EOFError:
                if typed:
                    print()  # the "> " line Ctrl-D left open
                return 0
            except KeyboardInterrupt:
                print("\n(an empty line or Ctrl-D leaves)", file=sys.stderr)
                continue
            if not line.strip() or line.strip() in LEAVE_CHAT:
                return 0
            if _attach_command(line, client, pending):
                continue
            if re.fullmatch(r"\s*/[A-Za-z?]*\s*", line):  # a chat tool's command (Ollama's /clear, /?), not a path
                print(f"locod chat has no {line.strip()}: {CHAT_KEYS}", file=sys.stderr)
                continue
            try:
                named, pending = pending, []  # the files are this question's, whether it is answered or refused
                frames = client.chat(
                    line,
                    session=session,
                    model=args.model,
                    attachments=_turn_files(client, named),
                    force=args.force,
                    max_tokens=args.max_tokens,
                    queued=True,
                )
                _stream(frames, False, args.verbose, client)
            except KeyboardInterrupt:
                print("\n[stopped]", file=sys.stderr)
                client.close()  # the daemon sees the client gone and cancels the turn
                client = _client(args)
            except LocodError as exc:
                if isinstance(exc, DaemonNotRunning):
                    raise
                # a file gone or grown since its /attach, a refused turn: the user must know the files went too
                dropped = " (its files are dropped: /attach again those a question needs)" if named else ""
                print(shown(f"locod: {exc.message}{dropped}"), file=sys.stderr)
    finally:
        client.close()


LEAVE_CHAT = ("/bye", "/exit", "/quit")  # Ollama's /bye, and what other chat tools take
CHAT_KEYS = (
    "/attach FILE (or /private FILE) adds a file to the next question; Ctrl-C stops an answer; an empty line, "
    "Ctrl-D or /bye leaves."
)
ATTACH_COMMANDS = {"/attach": False, "/private": True}  # the chat's words for ask's --attach and --private


def _attach_command(line: str, client: Client, pending: list[tuple[str, bool]]) -> bool:
    """Whether ``line`` is ``/attach`` or ``/private`` with its paths (shell quoting, as a terminal writes a
    dropped file's path, and ``~`` as a shell reads it: no shell reads this line); each file is read now, so
    a missing or oversized one is said before the question is typed, and added to ``pending``."""
    word, *rest = line.split(maxsplit=1) or [""]  # "/attach<Tab>FILE" too
    if word not in ATTACH_COMMANDS:
        return False
    try:
        paths = [os.path.expanduser(path) for path in shlex.split("".join(rest))]
    except ValueError as exc:  # an unclosed quote
        print(f"locod: {word}: {exc}", file=sys.stderr)
        return True
    if not paths:
        print(f"locod: {word} needs a file: {word} PATH", file=sys.stderr)
        return True
    for path in paths:
        try:
            _turn_files(client, [(path, ATTACH_COMMANDS[word])])
        except LocodError as exc:
            print(shown(f"locod: {exc.message}"), file=sys.stderr)
            continue
        pending.append((path, ATTACH_COMMANDS[word]))
        kept = "; it never leaves the device" if ATTACH_COMMANDS[word] else ""
        print(shown(f"[{path}: attached to the next question{kept}]"), file=sys.stderr)
    return True


def _check_model_offered(name: str, status: dict[str, Any]) -> None:
    local, cloud = status["local"]["models"], status["cloud"]["models"]
    if name not in local + cloud:
        raise UnknownModel(
            f"the daemon has no model named {name!r}; local models: {local}, cloud models: {cloud} (one added to "
            "the config or pulled since the daemon started is offered after `locod reload`)"
        )


def _local_line(loc: dict[str, Any]) -> str:
    """Every local model, the default first (as the cloud line lists every cloud model), and the cache."""
    unavailable = loc.get("unavailable", {})  # an older daemon's status has no such field
    others = [name for name in loc["models"] if name != loc["default"] and name not in unavailable]
    also = f"; also {', '.join(others)}" if others else ""
    left_out = [name for name in unavailable if name != loc["default"]]
    problems = f"; left out, no usable file (`locod models list`): {', '.join(left_out)}" if left_out else ""
    if loc["default"] in unavailable:
        problems += (
            f"; the default's file is not usable ({unavailable[loc['default']]}): its turns fail until it is back"
        )
    cache = loc["cache"]
    memory = f", {loc['resident_mb']} of {loc['memory_budget_mb']} MiB" if "resident_mb" in loc else ""  # older daemon
    return (
        f"{loc['default']}{also} (resident: {', '.join(loc['resident']) or 'none'}{memory}; "
        f"{_fmt(loc['tokens_per_s'], '{:.1f}')} tok/s){problems}; dialogue cache {cache['dialogues']} kept, "
        f"{cache['mb']:.0f}/{cache['limit_mb']:.0f} MiB, "
        f"{counted(cache['hits'], 'hit')}, {counted(cache['misses'], 'miss', 'misses')}"
    )


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.status()
    if args.json:
        _print_json(status)
        return 0
    t, r, c = status["telemetry"], status["routing"], status["cloud"]
    battery, power, net = power_and_network(t)
    rows = [
        ("daemon", f"locod {status['version']}, pid {status['pid']}, up {status['uptime_s']:.0f} s"),
        ("local", _local_line(status["local"])),
        ("cloud", f"{', '.join(c['models'])}; {_breakers(c)}; {_spending(c)}" if c["models"] else _no_cloud(c)),
        (
            "routing",
            f"mode {r['mode']}, policy {r.get('policy') or 'none (MESS+ alone)'}, SLA {r['sla']:.2f}, "
            f"attained {_fmt(r['attained'], '{:.3f}')} (labels where "
            f"given, predictions otherwise) over {counted(r['turns'], 'routed turn')}, Q {r['q']:.2f}, "
            f"{counted(r['shadow_labels'], 'shadow label')} and {counted(r['escalated_labels'], 'escalation label')}"
            + _out_of_reach(r, c),
        ),
        (
            "device",
            f"{battery}, {power}, power {_fmt(t['power_w'], '{:.1f} W')}, "
            f"CPU {_fmt(t['cpu_pct'], '{:.0f}%')}{_cpu_temperature(t['cpu_temp_c'])}, "
            f"GPU {_fmt(t['gpu_pct'], '{:.0f}%')}, free memory {_fmt(t['mem_available_mb'], '{:.0f} MiB')}",
        ),
        (
            "network",
            f"{net} {_link(t['link'])}, cloud endpoint {_reachable(t.get('cloud_reachable'))}, "
            f"RTT {_rtt(t)}, upload "
            f"{t['upload_bps'] / 1e6:.1f} MB/s{'' if t['upload_measured'] else ' (prior)'}",
        ),
        (
            "queue",
            f"{status['queue']['in_flight']} in flight, {status['queue']['waiting_for_local']} waiting "
            f"for the local model; {counted(status['sessions'], 'session')}",
        ),
    ]
    if r.get("predictors"):  # after the routing row; an older daemon's status has no such field
        rows.insert(4, ("learning", _predictors(r["predictors"])))
    if "db" in status:  # an older daemon's status has no such field
        rows.insert(1, ("files", _files(status)))
    if "http" in status:  # an older daemon's status has no such field
        off = "off: set http.listen to serve it (`locod serve --set http.listen=127.0.0.1:8080`; docs/http.md)"
        rows.insert(1, ("http", f"OpenAI-compatible API at {status['http']}" if status["http"] else off))
    lines = [f"{name:>8}  {text}" for name, text in rows] + [f"warning: {w}" for w in _status_warnings(status)]
    for line in lines:  # a prior's `source`, a policy file's error, a model's name: one line each, no escapes
        print(shown(line, layout=False))
    return 0


def _files(status: dict[str, Any]) -> str:
    """Where the running daemon serves and keeps its log: the paths an admin backs up, prunes and gives
    access to, which differ between a service, a user service and a daemon started by hand."""
    config = "none (built-in defaults)" if status["config"] == NO_CONFIG_FILE else status["config"]
    return f"socket {', '.join(status['endpoints'])}; config {config}; decision log {status['db']}"


def _status_warnings(status: dict[str, Any]) -> list[str]:
    """What needs the user's hand: a cloud model without its key, a policy file the daemon could not use, a
    decision log whose WAL cannot be checkpointed, a daemon running other code than this command."""
    warnings = [
        f"cloud model {name} has no API key: set ${env} (and restart) or its api_key_file (and reload)"
        for name, env in status["cloud"].get("no_api_key", {}).items()
    ]
    if status["routing"].get("policy_error"):  # routing.policy_path (or $LOCOD_POLICY) names an unusable file
        warnings.append(f"{status['routing']['policy_error']} (routing.policy_path, or $LOCOD_POLICY)")
    if status.get("db_warning"):  # an older daemon's status has no such field
        warnings.append(status["db_warning"])
    skew = _code_skew(status)
    return [*warnings, skew] if skew else warnings


def _code_skew(status: dict[str, Any]) -> str | None:
    """What to say when the daemon runs other code than this command's: one started before an upgrade keeps
    its old code (a `git pull` does not change ``__version__``), one of another installation its own."""
    ours = code_digest()
    if "code" not in status:  # a daemon older than the digest
        return (
            f"the daemon (locod {status['version']}) runs code older than this command's (its status has no code "
            "digest): restart it to run the installed version (`locod stop`, then start it as before)"
        )
    if status["code"] is None or ours is None or status["code"] == ours:
        return None
    return (
        f"the daemon runs other code than this command (code {status['code']}, installed {ours}): it was "
        "started before an upgrade, or from another installation; restart it to run this one (`locod stop`, "
        "then start it as before)"
    )


def _say_which_variables_stay_here(running: dict[str, Any], keyless: dict[str, str]) -> None:
    """A reload re-reads the config file in the daemon's environment, not the caller's: a ``LOCOD_*``
    override exported in this shell (``LOCOD_HTTP``), or a cloud key (``LOCOD_CLOUD_API_KEY``), reaches a
    daemon only when it starts. Said once, in one line, for just the variables whose value the running
    daemon does not have (a key's value is never compared: only whether the daemon has one)."""
    from locod.daemon.config import ENV_OVERRIDES, parsed_override

    differing = sorted({f"${var}" for var in keyless.values() if os.environ.get(var)})
    for var, key in ENV_OVERRIDES.items():
        text = os.environ.get(var, "")
        section, _, name = key.partition(".")
        if not text or section not in running or name not in running[section]:
            continue
        try:
            value = parsed_override(key, text, f"${var}")
        except ConfigError:
            value = text  # not a value the daemon could have either
        if value != running[section][name]:
            differing.append(f"${var}")
    if differing:
        print(
            f"note: {', '.join(differing)} in this shell {'is' if len(differing) == 1 else 'are'} not what the "
            "running daemon has: a reload reads the config file, and a daemon keeps the environment it was "
            "started with; put the value in the config file (a key: in an api_key_file), or restart the daemon with it",
            file=sys.stderr,
        )


def _say_which_key_files_are_not_read(running: dict[str, Any], from_env: list[str]) -> None:
    """A model's key variable, set in the daemon's environment, wins over its api_key_file: a key rotated in
    the file and reloaded is not used, and nothing else would say so (the old key keeps working until the
    provider revokes it)."""
    for model in running.get("cloud", {}).get("models", []):
        if model["name"] in from_env and model.get("api_key_file"):
            print(
                f"note: cloud model {model['name']} takes its key from ${model['api_key_env']} in the daemon's "
                f"environment, which wins over its api_key_file {model['api_key_file']}: a key written there is "
                f"used only once the daemon runs without ${model['api_key_env']} (docs/operations.md)",
                file=sys.stderr,
            )


def _no_cloud(cloud: dict[str, Any]) -> str:
    """No cloud model: every turn is local (spending is said only if a removed one spent today)."""
    spent = cloud["spent_today_usd"]
    return "none configured: every turn is answered locally ([[cloud.models]], docs/configuration.md)" + (
        f"; today {dollars(spent)}" if spent else ""
    )


def _breakers(cloud: dict[str, Any]) -> str:
    """The breakers' state; with several endpoints and some open, which: "breaker open" alone, beside turns
    answered in the cloud, read as if the cloud were off when only one model's endpoint was."""
    states = cloud.get("breakers", {})  # an older daemon's status has no such field
    opened = [url for url, state in states.items() if state == "open"]
    if not opened or len(opened) == len(states):
        return f"breaker {cloud['breaker']}"
    others = len(states) - len(opened)
    return f"breaker open for {', '.join(opened)} (the {'other is' if others == 1 else f'{others} others are'} closed)"


def _spending(cloud: dict[str, Any]) -> str:
    """Today's spend against the daily cap (and what a reached cap means), and today's cloud share."""
    spent, cap = cloud["spent_today_usd"], cloud["daily_cap_usd"]
    text = f"today {dollars(spent)}"
    if not cap:
        text += " (no daily cap: cloud.daily_cap_usd)"
    elif spent >= cap:
        text += (
            f" of the {dollars(cap)} cap: reached, the cloud is off until local midnight, forced turns included "
            "(raise cloud.daily_cap_usd and `locod reload`)"
        )
    else:
        text += f" of the {dollars(cap)} cap"
    answered = cloud.get("answered_today")  # an older daemon's status has no such field
    if answered and answered["turns"]:
        share = f"{answered['cloud'] / answered['turns']:.0%}"
        text += f"; {answered['cloud']} of {counted(answered['turns'], 'turn')} answered in the cloud today ({share})"
    return text


def _reachable(value: bool | None) -> str:
    return "not probed yet" if value is None else "reachable" if value else "unreachable"


def _link(link: str) -> str:
    return "(no network link)" if link == "none" else f"via {link}"  # "offline via none" read as a typo


def _rtt(telemetry: dict[str, Any]) -> str:
    """The probe's round trip; after a failed probe, the last one measured with its age (a bare "RTT 1 ms"
    beside "unreachable" read as a measurement of now)."""
    ms, age = telemetry["rtt_ms"], telemetry.get("rtt_age_s")
    if ms is None or telemetry.get("cloud_reachable") is not False or age is None:
        return _fmt(ms, "{:.0f} ms")
    return f"n/a (the last, {ms:.0f} ms, {age:.0f} s ago)"


def _cpu_temperature(celsius: float | None) -> str:
    """The CPU's temperature after its load (at 52°C); unknown, it says so: a bare "at n/a" read as a missing clock."""
    return " (temperature n/a)" if celsius is None else f" at {celsius:.0f}°C"


def _fmt(value: Any, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def _predictors(predictors: dict[str, dict[str, Any]]) -> str:
    """Where each local model's predictor started and how much it has learned since: a model that starts
    from the task priors routes near chance until a few hundred labels (docs/routing.md). Models alike in
    both share one clause: copies of one GGUF under several settings repeated it word for word."""
    started = {
        None: "the task priors (no prior for its GGUF)",
        "shipped": "the prior shipped for its GGUF",
    }
    alike: dict[str, list[str]] = {}
    for name, p in predictors.items():
        said = (
            started.get(p["prior"], f"your prior {p['prior']}")
            + (f", fitted on {p['fitted_on']}" if p["fitted_on"] else "")
            + f", {counted(p['labels'], 'label')} since"
        )
        alike.setdefault(said, []).append(name)
    return "; ".join(f"{', '.join(names)} from {said}" for said, names in alike.items())


def _out_of_reach(routing: dict[str, Any], cloud: dict[str, Any]) -> str:
    """Why the attained satisfaction stays below the SLA, when no model on offer is predicted to reach it."""
    if not routing["infeasible"]:
        return ""
    capped = cloud["daily_cap_usd"] and cloud["spent_today_usd"] >= cloud["daily_cap_usd"]
    remedy = (
        "raise cloud.daily_cap_usd or lower routing.sla"
        if capped
        else "lower routing.sla"
        if cloud["models"]
        else "configure a cloud model or lower routing.sla"
    )
    return f"; SLA out of reach: no model on offer is predicted to reach it ({remedy})"


def cmd_decisions(args: argparse.Namespace) -> int:
    try:
        with _client(args) as client:
            rows = client.decisions(args.limit, args.of)
    except DaemonNotRunning:  # the log is a file: what happened can be read with the daemon stopped
        from locod.daemon.records import read_recent

        db_path = _at_rest(_config(args)).db_path
        rows = read_recent(db_path, args.limit, args.of)
        print(f"(locod is not running: read from {db_path})", file=sys.stderr)
    if args.of is not None and not rows:
        raise UnknownDecision(f"no decision record has the id {args.of!r}; `locod decisions` lists the newest")
    if args.json:
        _print_json(rows)
        return 0
    if args.of is not None:  # one decision: why it went where it did, in words
        print("\n".join(explain(rows[0])))
        return 0
    columns = (
        "id",
        "time",
        "session",
        "turn",
        "task",
        "location",
        "model",
        "outcome",
        "tokens_out",
        "latency_total_ms",
        "cost_usd",
        "satisfied",
        "shadow",
        "reason",
    )
    table = [[_column(row, c) for c in columns] for row in reversed(rows)]
    widths = [max(len(c), *(len(r[i]) for r in table)) if table else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    for row in table:  # the reason comes last and whole: it is the column people read
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    return 0


def _decision_id(text: str) -> int:
    """``feedback``'s decision id, read as ``locod decisions ID`` reads one: ASCII digits alone. Python's
    ``int`` also takes ``3_0`` (30), `` 3`` and ``３``, so a slip labelled another decision, and a label is
    final; ``decisions`` calls each of them no decision."""
    if not (text.isascii() and text.isdecimal()):
        raise argparse.ArgumentTypeError(f"expects a decision id, digits as `locod decisions` shows it, got {text!r}")
    return int(text)


def _limit(text: str) -> int:
    """``decisions --limit``: the range the daemon takes, checked before asking it (or the file)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a whole number, got {text!r}") from None
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"must be between 1 and 1000, got {value}")
    return value


def _since(text: str) -> str:
    """``report --since``: a period checked as the command line is read, so a wrong one is a usage error
    (exit 2, as every other wrong argument), not a refused request (exit 1)."""
    from locod.daemon.history import parse_since

    try:
        parse_since(text)
    except RequestError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--since ")) from None
    return text


def _column(row: dict[str, Any], column: str) -> str:
    try:
        return _formatted(row, column)
    except (TypeError, ValueError, KeyError):  # a value of a type locod does not write: another program's row
        return _cell(row.get(column))


def _formatted(row: dict[str, Any], column: str) -> str:
    if column == "time":
        return _time(row["created"])
    if column == "cost_usd" and row.get("cost_usd") is not None:  # dollars as `ask -v` prints them, not 4.1e-05
        return f"{row['cost_usd']:.5f}"
    if column == "latency_total_ms" and row.get(column) is not None:  # whole ms as `ask -v` prints them, not 1.4e+04
        return f"{row[column]:.0f}"
    if column == "location":  # where it was answered, as `model` is the model that answered (after a fallback
        return _cell(row.get("backend") or row.get("location"))  # or an escalation); decided: --json's location
    if column == "shadow":  # the local model's background answer to a cloud turn, as graded
        shadow = row.get("shadow")
        return "-" if not shadow else "good" if shadow["satisfied"] else "bad"
    return _cell(row.get(column))


def _time(created: float) -> str:
    """Local time of day, with the date when it is not today."""
    import time

    moment = time.localtime(created)
    today = time.localtime()[:3] == moment[:3]
    return time.strftime("%H:%M:%S" if today else "%Y-%m-%d %H:%M", moment)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return shown(str(value), layout=False)  # a client's session id: no escape sequence, one line per row


def cmd_feedback(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.feedback(args.decision, args.label == "good")
    labelled = f"decision {result['decision']} labelled {'good' if result['satisfied'] else 'bad'}"
    if "sla" not in result:  # a daemon of before the feedback result said it
        print(f"{labelled}; Q is now {result['q']:.2f}")
        return 0
    if result.get("routed") is False:  # an older daemon's result has no such field
        print(
            f"{labelled}; the request or the config chose where it ran (--force, --model, routing.mode): no part "
            f"of the SLA ({_fmt(result['attained'], '{:.3f}')} so far against {result['sla']:.2f}, over routed turns) "
            "and MESS+ does not learn from it; `locod policy train --from-db` does"
        )
        return 0
    print(
        f"{labelled}; satisfaction so far {_fmt(result['attained'], '{:.3f}')} against the SLA {result['sla']:.2f}; "
        f"queue Q now {result['q']:.2f} (the shortfall the turns left: a higher Q sends more to the cloud)"
    )
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.reload()
        running = client.daemon_config() if result["reloaded"] else {}
        status = client.status()
    cloud = status["cloud"] if result["reloaded"] else {}
    keyless = cloud.get("no_api_key", {})
    skew = _code_skew(status)
    if skew:  # a key or a policy of the installed version is unknown to the daemon's code
        print(f"note: {skew}; a reload re-reads the configuration and the policy, not the code", file=sys.stderr)
    if not result["reloaded"]:
        why = result.get("error") or "the configuration is invalid (see the daemon's log)"  # an older daemon
        print(f"locod: reload rejected, the running configuration kept: {why}", file=sys.stderr)
        return 2
    source = result.get("config")
    if source == NO_CONFIG_FILE:
        print("reloaded, but no config file was found: defaults and LOCOD_* variables only")
    else:
        print(f"reloaded from {source}")
    if result.get("models_changed"):  # an older daemon does not say
        print(f"local models: {'; '.join(result['models_changed'])}")
    if result.get("restart_needed"):
        print(f"changed in [{'], ['.join(result['restart_needed'])}]: takes effect when the daemon restarts")
    _say_which_variables_stay_here(running, keyless)
    _say_which_key_files_are_not_read(running, cloud.get("key_from_env", []))  # an older daemon: none
    for why in result.get("left_out", {}).values():  # the daemon's own look at the files (an older one: none)
        print(f"note: {why}; it is left out of routing until then", file=sys.stderr)
    if result.get("policy_error"):  # the configuration applied, but the routing policy it names was refused
        print(f"locod: the routing policy was refused: {result['policy_error']}", file=sys.stderr)
        return 1
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    """SIGTERM to the daemon: it refuses new turns, lets those in flight finish (within
    daemon.shutdown_grace_s), then exits; this waits for that, up to ``--timeout`` seconds. Only a process
    that answers locod's ping with the pid the kernel names as the socket's listener is signalled."""
    import time

    from locod.client import listener_pid

    if not args.endpoint:
        _config(args)  # a config that does not load names no socket: never fall back to another daemon's
    with _client(args) as client:
        endpoint = client.endpoint
        reported = int(client.ping()["pid"])  # something that is not locod does not answer
    path = endpoint[len("ipc://") :]
    if not endpoint.startswith("ipc://") or Path(path).is_symlink():
        raise LocodError(f"locod stop signals only a daemon on a socket file of this machine, not {endpoint}")
    pid = listener_pid(path)
    if pid != reported:
        raise LocodError(f"the locod at {endpoint} runs in another pid namespace (a container?): stop it there")
    try:
        os.kill(pid, signal.SIGTERM)
    except PermissionError:
        raise LocodError(
            f"locod (pid {pid}) is another user's: for the system service, sudo systemctl stop locod"
        ) from None
    except ProcessLookupError:
        raise LocodError(f"locod (pid {pid}) is already gone") from None
    print(f"stopping locod (pid {pid}): turns in flight finish first", file=sys.stderr)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if _exited(pid):
            print("stopped", file=sys.stderr)
            return 0
        time.sleep(0.1)
    raise LocodError(f"locod (pid {pid}) is still stopping after {args.timeout:g} s; see its log")


def _exited(pid: int) -> bool:
    """Gone, or a zombie its parent has not reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def cmd_config_show(args: argparse.Namespace) -> int:
    """The running daemon's configuration, as it runs; with ``--new`` or ``--set`` (or no daemon running, one
    too old to say, or ``--config`` naming another file than the daemon's: checking a file before a
    restart), the one a daemon started now would run with."""
    new = bool(args.new or args.set)
    data, header = _running_config(args) if not new else (None, "")
    if data is not None and args.config and not _same_file(args.config, str(data["source"])):
        header = f"the running daemon reads {data['source']}, not this file; "
        data = None
    if data is None:
        from locod.daemon.config import as_dict

        data = as_dict(_config(args))
        whence = "" if new else (header or "no daemon is running: ")
        header = f"# {whence}what `locod serve` would start with now: {_sources(data['source'])}"
    if args.json:
        _print_json(data)
        return 0
    print(header)
    data.pop("source")
    for section, values in data.items():
        scalars = {k: v for k, v in values.items() if not (isinstance(v, list) and v and isinstance(v[0], dict))}
        print(f"\n[{section}]")
        _print_toml_keys(scalars)
        for key, items in values.items():
            if key in scalars:
                continue
            for item in items:
                print(f"\n[[{section}.{key}]]")
                _print_toml_keys(item)
    return 0


def _running_config(args: argparse.Namespace) -> tuple[dict[str, Any] | None, str]:
    """The running daemon's configuration and a header naming it; (None, "") when none runs. Whether the
    config file loads is not its business (the daemon runs what it read): without a daemon, it is said."""
    try:
        with _client(args, warn=False) as client:
            reply = client.config()
    except DaemonNotRunning:
        return None, ""
    except ConfigError:
        _config(args)  # a file that does not load and no daemon: its error alone is what `config show` says
        raise
    except LocodError as exc:
        if exc.code != "unknown_op":
            raise
        return None, "the running daemon is older than this locod and cannot say (restart it); "
    data = reply["config"]
    header = (
        f"# the running daemon's configuration (pid {reply['pid']}): {_sources(data['source'])} as it was "
        "started or last reloaded;\n# `locod config show --new` shows what a daemon started now would use"
    )
    return data, header


def _same_file(path: str, source: str) -> bool:
    return source != NO_CONFIG_FILE and Path(path).resolve() == Path(source).resolve()


def _sources(source: str) -> str:
    start = "built-in defaults (no config file found)" if source == NO_CONFIG_FILE else source
    return f"{start}, then LOCOD_* variables and --set overrides"


def _print_toml_keys(values: dict[str, Any]) -> None:
    """``key = value`` lines that load back as TOML (JSON's strings, numbers, booleans and arrays are
    TOML's); TOML has no null, so an unset key is a comment."""
    for key, value in values.items():
        print(f"# {key} is not set" if value is None else f"{key} = {json.dumps(value)}")


def cmd_models_fetch(args: argparse.Namespace) -> int:
    from locod.daemon.config import EMBEDDED_MODEL
    from locod.daemon.fetch import fetch

    directory = Path(args.dir) if args.dir else _models_config(args).models_dir
    fetch(args.name or EMBEDDED_MODEL.name, directory, progress=lambda line: print(line, file=sys.stderr, flush=True))
    return 0


def cmd_models_pull(args: argparse.Namespace) -> int:
    from locod.daemon.download import DEFAULT_MAX_BYTES, terminal_meter
    from locod.daemon.pull import parse_size, pull_model

    config = _models_config(args)
    max_bytes = parse_size(args.max_size) if args.max_size else DEFAULT_MAX_BYTES
    meter = terminal_meter(args.name or args.source.rsplit("/", 1)[-1], _say)
    model = pull_model(
        config,
        args.source,
        name=args.name,
        sha256=args.sha256,
        n_ctx=args.ctx,
        meter=meter,
        progress=_say,
        max_bytes=max_bytes,
    )
    _say(
        f"a running daemon offers it after `locod reload`: then --model {model.name} names it (or make it the "
        f"default: local.default = {json.dumps(model.name)} in the config file, and reload)"
    )
    return 0


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def cmd_models_list(args: argparse.Namespace) -> int:
    from locod.daemon.catalog import model_rows, table
    from locod.daemon.config import redacted_url

    config = _models_config(args)
    running = _running_models(args)
    rows = model_rows(config, None if running is None else running["resident"])
    if args.json:
        _print_json([row.as_dict() for row in rows])
        return 0
    print("\n".join(table(rows)))
    print(
        f"memory: the weights plus the KV cache at that context, counted against local.memory_budget_mb "
        f"({config.local.memory_budget_mb} MiB)"
    )
    for cloud in config.cloud.models:
        print(f"cloud: {cloud.name}, {cloud.model} at {redacted_url(cloud.base_url)}")
    if running is None:
        print("(no daemon is running: nothing is loaded)")
        return 0
    names = [m.name for m in config.local.models] + [m.name for m in config.cloud.models]
    unknown = [name for name in names if name not in running["models"]]
    if unknown:
        print(f"not known to the running daemon until `locod reload`: {', '.join(unknown)}")
    return 0


def _models_config(args: argparse.Namespace) -> Any:
    """The configuration with the models directory of the daemon that runs, if one does: a service's differs
    from a shell's (the system unit sets LOCOD_MODELS_DIR=/var/lib/locod/models), and a model pulled into the
    shell's would never reach the service, nor would `models list` show the files it runs."""
    from locod.daemon.config import load_config

    overrides = _overrides(args)
    try:
        with _client(args, warn=False) as client:
            overrides["paths.models_dir"] = client.daemon_config()["paths"]["models_dir"]
    except DaemonNotRunning:
        pass
    return load_config(args.config, overrides=overrides)


def _running_models(args: argparse.Namespace) -> dict[str, list[str]] | None:
    """The running daemon's models: ``resident`` (loaded) and ``models`` (local and cloud, configured when it
    started or last reloaded); None when it is not running."""
    try:
        with _client(args) as client:
            status = client.status()
    except DaemonNotRunning:
        return None
    return {"resident": status["local"]["resident"], "models": status["local"]["models"] + status["cloud"]["models"]}


def cmd_models_rm(args: argparse.Namespace) -> int:
    from locod.daemon.pull import remove_model

    print(f"removed {args.name} ({remove_model(_models_config(args), args.name)})")
    running = _running_models(args)
    if running is not None and args.name in running["models"]:  # loaded into memory, it answers on
        _say(f"the running daemon offers {args.name} until `locod reload`")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from locod.report import write_report

    out = write_report(_as_running(args), since=args.since, out=args.out)
    print(f"wrote {out}")
    return 0


def cmd_policy_train(args: argparse.Namespace) -> int:
    from locod.policy.train_cli import main as train_main

    return train_main(args.train_args, default_out=_as_running(args).state_dir / "policy.onnx")


def _as_running(args: argparse.Namespace) -> Any:
    """The configuration, with the state directory (and daily cap) of the daemon that runs, if one does:
    a service's differs from a shell's (systemd's $STATE_DIRECTORY, /var/lib/locod), and `locod report` must
    read the log it writes, `locod policy train` write the policy where it loads it."""
    import dataclasses

    config = _config(args)
    try:
        with _client(args, warn=False) as client:
            running = client.daemon_config()
    except DaemonNotRunning:
        return _at_rest(config)
    return dataclasses.replace(
        config,
        paths=dataclasses.replace(config.paths, state_dir=running["paths"]["state_dir"]),
        cloud=dataclasses.replace(config.cloud, daily_cap_usd=running["cloud"]["daily_cap_usd"]),
    )


def _at_rest(config: Any) -> Any:
    """With no daemon running: the configuration, or, when only the system service's state directory holds a
    decision log, that directory's, as ``locate`` picks the system socket. Only for the service's own user:
    SQLite creates its -wal and -shm files even for a reader, and root's would leave the service (User=locod)
    unable to open its own log at its next start."""
    import dataclasses

    from locod.daemon.ownership import user_name

    system_db = SYSTEM_STATE_DIR / config.db_path.name
    if os.path.exists(config.db_path) or not os.path.exists(system_db):
        return config  # os.path: a directory this user may not enter is no log to read, not an error
    owner = os.stat(SYSTEM_STATE_DIR).st_uid
    if owner != os.geteuid():
        raise StorageError(
            f"no decision log at {config.db_path}; the system service's, {system_db}, is read as its user: "
            f"`sudo -u {user_name(owner)} locod ...`"
        )
    return dataclasses.replace(config, paths=dataclasses.replace(config.paths, state_dir=str(SYSTEM_STATE_DIR)))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="locod",
        description="Local-cloud LLM daemon for edge devices.",
        parents=[_global_options(None)],
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"locod {__version__}")
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
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("global options (before or after the command)")
    group.add_argument(
        "--config",
        default=default,
        help="config file (default: $LOCOD_CONFIG, $XDG_CONFIG_HOME/locod/config.toml (~/.config/locod/config.toml), "
        "/etc/locod/config.toml)",
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
        "--endpoint", default=default, help="daemon endpoint (default: the ipc socket in the runtime directory)"
    )
    group.add_argument(
        "--secret",
        default=default,
        help="shared secret for a tcp endpoint (other users can read it in the process list: prefer --secret-file "
        "or $LOCOD_SECRET)",
    )
    group.add_argument(
        "--secret-file",
        default=default,
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
        return self.action.add_parser(name, parents=[_AFTER], **kwargs)

    def nested(self, name: str, help: str) -> _Subcommands:
        return _Subcommands(self.action.add_parser(name, help=help).add_subparsers(required=True, metavar="ACTION"))


_AFTER = _global_options(argparse.SUPPRESS)


def _add_turn_commands(sub: Any) -> None:
    """``ask`` and ``chat``."""
    for name, func, text in (
        ("ask", cmd_ask, "ask one question and stream the answer"),
        ("chat", cmd_chat, "interactive multi-turn chat"),
    ):
        p = sub.add_parser(name, help=text)
        if name == "ask":
            p.add_argument("prompt", nargs="?", help="the question; - (or none, with a pipe) reads standard input")
            for flag, meaning in (
                ("--attach", "image or document to attach"),
                ("--private", "attachment that never leaves the device"),
            ):
                p.add_argument(flag, action="append", metavar="FILE", help=f"{meaning} (repeatable)")
        p.add_argument("--model", help="answer with this configured model (`locod models list` names them)")
        p.add_argument(
            "--max-tokens", type=_option("max_tokens"), help="answer length limit (default: local.max_tokens)"
        )
        if name == "ask":
            p.add_argument("--temperature", type=_option("temperature"), help="sampling temperature, 0-2")
            p.add_argument("--seed", type=_option("seed"), help="sampling seed, for a repeatable local answer")
            p.add_argument(
                "--stop", action="append", type=_stop_text, metavar="TEXT", help="end the answer before TEXT (up to 4)"
            )
            p.add_argument("--json", action="store_true", help="print every frame as JSON")
        p.add_argument("--session", help="session id (keeps the dialogue history)")
        p.add_argument("--force", choices=("local", "cloud"), help="skip routing")
        p.add_argument("-v", "--verbose", action="store_true", help="show where and why each turn ran")
        p.set_defaults(func=func)


def _option(name: str) -> Callable[[str], Any]:
    """A flag's type for the chat option ``name``: the socket's own rule (protocol.option_problem), said as
    argparse says a bad flag (``argument --temperature: must be ...``), not as a protocol field."""
    kind = OPTION_RULES[name][0]

    def parse(text: str) -> Any:
        try:
            value = kind(text)
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
        metavar="ID",
        help="only this decision: its id (`x-locod-decision`, `locod ask -v`) or its request id (an HTTP "
        "completion's `id`, chatcmpl-...)",
    )
    p.add_argument("--limit", type=_limit, default=20, help="how many of the newest, 1-1000 (default 20)")
    p.add_argument("--json", action="store_true", help="whole records as JSON, one array")
    p.set_defaults(func=cmd_decisions)

    p = sub.add_parser("feedback", help="label a decision's answer good or bad (trains the router)")
    p.add_argument("decision", type=_decision_id, help="the decision id (`locod ask -v` and `locod decisions` show it)")
    p.add_argument("label", choices=("good", "bad"), help="whether the answer was good; a label is final")
    p.set_defaults(func=cmd_feedback)

    p = sub.add_parser("reload", help="re-read the configuration and the policy")
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("stop", help="stop the daemon (as SIGTERM: turns in flight finish first)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for it to exit (default 60)")
    p.set_defaults(func=cmd_stop)


def _add_offline_commands(sub: Any) -> None:
    """What works without a daemon: ``config``, ``models``, ``report``, ``policy``."""
    config = sub.nested("config", help="configuration")
    p = config.add_parser("show", help="print the running daemon's effective configuration (no secrets)")
    p.add_argument("--json", action="store_true", help="JSON instead of TOML")
    p.add_argument("--new", action="store_true", help="what a daemon started now would use, not the running one's")
    p.set_defaults(func=cmd_config_show)

    models = sub.nested("models", help="local models")
    p = models.add_parser("fetch", help="download and verify a model of the manifest")
    p.add_argument("name", nargs="?", help="a model of models/manifest.toml (default: the embedded one)")
    p.add_argument("--dir", help="models directory (default: paths.models_dir)")
    p.set_defaults(func=cmd_models_fetch)
    p = models.add_parser("pull", help="download a GGUF (URL or hf://owner/repo/file.gguf) and register it")
    p.add_argument("source", help="an http(s) URL of a .gguf, or hf://owner/repo/file.gguf")
    p.add_argument("--name", help="the model's name (default: the file's name in lower case, without .gguf)")
    p.add_argument("--sha256", help="expected SHA-256 (the hub's published one is checked anyway)")
    p.add_argument("--ctx", type=int, help="context size to load it with (default: its trained context, at most 4096)")
    p.add_argument("--max-size", help="the largest file to accept, e.g. 80G (default 64G): a download stops there")
    p.set_defaults(func=cmd_models_pull)
    p = models.add_parser("list", help="local models: size, quantisation, context, loaded, path")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(func=cmd_models_list)
    p = models.add_parser("rm", help="remove a pulled model and its file")
    p.add_argument("name", help="the model's name, as `locod models list` shows it")
    p.set_defaults(func=cmd_models_rm)

    p = sub.add_parser("report", help="charts of what the router did, from the decision log")
    p.add_argument("--since", type=_since, default="7d", help="how far back: 30m, 12h, 7d, 4w (default 7d)")
    p.add_argument("--out", default="report.png", help="report.png or report.html (default report.png)")
    p.set_defaults(func=cmd_report)

    policy = sub.nested("policy", help="the TMO routing policy")
    p = policy.add_parser(
        "train", help="train with RC-PPO and export ONNX (`locod policy train --help` for its options)", add_help=False
    )
    p.set_defaults(func=cmd_policy_train)  # its options are the trainer's own: main() passes them through


if __name__ == "__main__":
    sys.exit(main())
