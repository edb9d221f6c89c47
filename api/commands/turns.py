"""``locod ask`` and ``locod chat``: a turn's frames printed as they come, the answer on stdout and on stderr
what the user should know (a notice, a fallback, with ``-v`` where and why it ran)."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from locod.commands.common import connect, frame_json
from locod.errors import DaemonNotRunning, LocodError, ModelError, RequestError
from locod.protocol import (
    Attachment,
    DecisionFrame,
    DeltaFrame,
    DoneFrame,
    EscalatedFrame,
    FallbackFrame,
    Frame,
    QueuedFrame,
)
from locod.terminal import for_stream, shown
from locod.words import counted

if TYPE_CHECKING:  # imported when a command talks to the daemon (pyzmq): `locod --help` stays quick
    from locod.client import Client


def cmd_ask(args: argparse.Namespace) -> int:
    """``ask``; with ``--json`` every frame is a JSON line, and an error ends the stream with an ``error``
    frame's (``error_json``, which the command line prints for every ``--json`` command that fails)."""
    with connect(args) as client:
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
        return _stream(frames, args.json, args.verbose, client, args.max_tokens)


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


def _prompt(words: list[str]) -> str:
    """The prompt's words as given, joined, or read from standard input for ``-`` or when it is a pipe."""
    if words and words != ["-"]:
        return _utf8(" ".join(words), "the command line")
    if not words and sys.stdin.isatty():
        raise LocodError('ask needs a prompt: `locod ask "question"`, or `-` to read it from standard input')
    text = sys.stdin.read().strip()
    if not text:
        raise RequestError("the prompt read from standard input is empty")
    return _utf8(text, "standard input")


UNDECODED_BYTE = re.compile("[\udc80-\udcff]")  # how Python's surrogateescape reads a byte that is not UTF-8


def _utf8(text: str, where: str) -> str:
    """``text`` when it is UTF-8; Python reads undecodable bytes (a Latin-1 file, a binary) as lone
    surrogates, which the daemon refuses in words about UTF-16 that do not say what the user gave. In an
    ASCII locale (``LC_ALL=C`` without UTF-8 mode) every non-ASCII byte reads so: UTF-8 bytes are text, and
    were refused as "not UTF-8"."""
    bad = UNDECODED_BYTE.search(text)
    if bad is None:
        return text
    with contextlib.suppress(UnicodeError):
        return text.encode("utf-8", "surrogateescape").decode("utf-8")
    byte = ord(bad.group()) - 0xDC00
    raise RequestError(
        f"the prompt on {where} is not UTF-8 text (byte 0x{byte:02x} at character {bad.start()}); convert it first, "
        "e.g. `iconv -f latin1 -t utf-8`"
    )


def _stream(frames: Iterator[Frame], as_json: bool, verbose: bool, client: Client, max_tokens: int | None) -> int:
    """Print a turn: the answer on stdout; on stderr whatever the user should know (always: a notice that
    the answer did not come from where they asked, or without something they gave; a fallback; an answer cut
    at its length limit, ``max_tokens`` or the daemon's default), and with
    ``verbose`` where and why it ran (for a local answer that could have escalated, read from its record once
    the turn is done: no frame says why it was kept). The decision's notice waits for the answer: a local
    answer that escalates is never shown, and the escalation or fallback says what the answer given missed."""
    streamed, done, notice = False, None, None
    for frame in _cut_off(frames):
        if notice and isinstance(frame, DeltaFrame | DoneFrame):  # the answer the notice is about
            print(shown(f"[{notice}]"), file=sys.stderr)
            notice = None
        if as_json:
            print(frame_json(frame))
        elif isinstance(frame, DeltaFrame):
            streamed = True
            print(for_stream(frame.text, sys.stdout), end="", flush=True)
        elif isinstance(frame, QueuedFrame):
            if verbose:
                print(f"[waiting for the local model: {frame.ahead} turn(s) ahead]", file=sys.stderr)
        elif isinstance(frame, DecisionFrame) and verbose:
            _say_decision(frame)
        elif isinstance(frame, DecisionFrame):
            notice = frame.notice  # said with the answer it is about
        elif isinstance(frame, FallbackFrame | EscalatedFrame):
            notice = None  # the notice was of the answer this frame replaces; its message says what the new one misses
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
    if done is not None and not as_json:
        _say_if_cut(client, done, max_tokens)
    if verbose and done is not None and (done.outcome, done.location) == ("ok", "local"):
        _say_why_kept(client, done.decision)
    return 0


def _say_if_cut(client: Client, done: DoneFrame, max_tokens: int | None) -> None:
    """Say that an answer was cut short (its backend's ``finish_reason`` "length"): it ends mid-sentence, and a
    user used to tools without a default limit (Ollama's) took it for the model's whole answer, knowing nothing
    of local.max_tokens. Short of the limit, it was a local model's context that filled, or a cloud endpoint's
    own cap (a provider's most output tokens), which no setting of locod's raises."""
    if done.finish_reason != "length":
        return
    try:
        limit = max_tokens or int(client.daemon_config()["local"]["max_tokens"])
    except LocodError:  # the configuration refused (a tcp client): the limit goes unnamed
        limit = None
    if limit is not None and done.tokens_out < limit and done.location == "cloud":
        asked = counted(limit, "token")
        said = f"the cloud endpoint stopped the answer at its own length limit, before the {asked} asked"
    elif limit is not None and done.tokens_out < limit:
        said = (
            "the answer stopped where the model's context was full: a new session, or a larger n_ctx, leaves more room"
        )
    else:
        flag = "--max-tokens N" if max_tokens else "--max-tokens N, or local.max_tokens in the config"
        size = f", {counted(limit, 'token')}" if limit else ""
        said = f"the answer stopped at its length limit{size}: for a longer one, {flag}"
    print(f"[{said}]", file=sys.stderr)


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


def _say_decision(frame: DecisionFrame) -> None:
    """``-v``'s line: where the turn runs, what it uploads and why (its reason holds what a notice says)."""
    sent = ", ".join(frame.attachments_sent) or "none"
    line = f"[{frame.location}: {frame.model}; uploaded to the cloud: {sent}; {frame.reason}]"
    print(shown(line), file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> int:
    """Multi-turn chat. Ctrl-C stops the answer being written and returns to the prompt (the daemon
    cancels the turn and records it so); Ctrl-D, an empty line or ``/bye`` leaves."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    session = args.session or f"chat-{uuid.uuid4().hex[:8]}"
    client = connect(args)  # a stopped daemon is said before the user types a first question
    if args.model is not None:  # and a model it does not have, rather than at every turn
        try:
            _check_model_offered(args.model, client)
        except LocodError:
            client.close()
            raise
    print(f"locod chat, session {session}. {CHAT_KEYS}", file=sys.stderr)
    typed = sys.stdin.isatty()  # a dialogue piped in gets its answers alone on stdout, no "> " before each
    pending: list[tuple[str, bool]] = []  # (path, private): the files /attach and /private add to the next question
    try:
        while (line := _next_line(typed)) is not None:
            if _attach_command(line, client, pending):
                continue
            if re.fullmatch(r"\s*/[A-Za-z?]*\s*", line):  # a chat tool's command (Ollama's /clear, /?), not a path
                print(f"locod chat has no {line.strip()}: {CHAT_KEYS}", file=sys.stderr)
                continue
            named, pending = pending, []  # the files are this question's, whether it is answered or refused
            client = _chat_turn(client, args, session, line, named)
        return 0
    finally:
        client.close()


def _next_line(typed: bool) -> str | None:
    """The next question (typed, or piped), or None to leave: Ctrl-D, an empty line, ``/bye``. Ctrl-C at the
    prompt says how to leave and asks again."""
    while True:
        try:
            line = input("> " if typed else "")
        except EOFError:
            if typed:
                print()  # the "> " line Ctrl-D left open
            return None
        except KeyboardInterrupt:
            print("\n(an empty line or Ctrl-D leaves)", file=sys.stderr)
            continue
        return None if not line.strip() or line.strip() in LEAVE_CHAT else line


def _chat_turn(
    client: Client, args: argparse.Namespace, session: str, line: str, named: list[tuple[str, bool]]
) -> Client:
    """One question of the chat, with its files, streamed; the client to go on with. Ctrl-C stops the answer:
    the daemon sees the client gone and cancels the turn, and a new client asks the next question."""
    try:
        frames = client.chat(
            _utf8(line, "this line"),
            session=session,
            model=args.model,
            attachments=_turn_files(client, named),
            force=args.force,
            max_tokens=args.max_tokens,
            queued=True,
        )
        _stream(frames, False, args.verbose, client, args.max_tokens)
    except KeyboardInterrupt:
        print("\n[stopped]", file=sys.stderr)
        client.close()
        return connect(args)
    except LocodError as exc:
        if isinstance(exc, DaemonNotRunning):
            raise
        # a file gone or grown since its /attach, a refused turn: the user must know the files went too
        dropped = " (its files are dropped: /attach again those a question needs)" if named else ""
        print(shown(f"locod: {exc.message}{dropped}"), file=sys.stderr)
    return client


LEAVE_CHAT = ("/bye", "/exit", "/quit")  # Ollama's /bye, and what other chat tools take


CHAT_KEYS = (
    "/attach FILE (or /private FILE) adds a file to the next question; Ctrl-C stops an answer; an empty line, "
    "Ctrl-D or /bye leaves."
)


ATTACH_COMMANDS = {"/attach": False, "/private": True}  # the chat's words for ask's --attach and --private


def _attach_command(line: str, client: Client, pending: list[tuple[str, bool]]) -> bool:
    """Whether ``line`` is ``/attach`` or ``/private`` with its paths (shell quoting, as a terminal writes a
    dropped file's path, and ``~`` as a shell reads it: no shell reads this line; a file's path typed as it
    is, spaces and all, is that one file); each file is read now, so a missing or oversized one is said
    before the question is typed, and added to ``pending``."""
    word, *rest = line.split(maxsplit=1) or [""]  # "/attach<Tab>FILE" too
    if word not in ATTACH_COMMANDS:
        return False
    typed = "".join(rest).strip()
    whole = os.path.expanduser(typed)
    try:
        paths = [whole] if os.path.isfile(whole) else [os.path.expanduser(path) for path in shlex.split(typed)]
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


def _check_model_offered(name: str, client: Client) -> None:
    """Refuse a model the daemon does not offer before the first question, in the daemon's own words (the
    name meant, when it is a cloud model's endpoint id or a local model's file), not after it is typed."""
    status = client.status()
    if name in status["local"]["models"] + status["cloud"]["models"]:
        return
    from locod.daemon.decision import Offered, unknown_model

    default = status["local"]["default"]  # kept on offer whatever its file, as routing keeps it
    unusable = status["local"]["unavailable"]  # by error code, all the refusal says of why
    left_out = {m: ModelError(code, code=code) for m, code in unusable.items() if m != default}
    raise unknown_model(Offered.described(client.daemon_config()), name, left_out)
