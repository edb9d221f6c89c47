#!/usr/bin/env python3
"""Where the daemon's share of the first token goes: perf_counter_ns stamps along one turn's path, in the
client and inside a daemon started with hooks around the steps (request parse, session and attachments,
decision, prompt build and fit, record commit, the prompt's reading in llama.cpp, frames posted and
sent), medians over alternating rounds with llama-cpp-python called directly on the same prompt.

The hooks are installed only in the daemon this script starts (through a ``sitecustomize`` on its
PYTHONPATH), so the daemon itself carries no tracing code. Both processes read CLOCK_MONOTONIC, so the
stamps share one time line: each is reported as ms since the client's call.

    python scripts/trace_first_token.py [--rounds 30]
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PROMPT = "Name one primary colour."
_stamps: list[tuple[str, int]] = []


def stamp(label: str) -> None:
    _stamps.append((label, time.perf_counter_ns()))


def _around(owner: Any, name: str, label: str) -> None:
    original = getattr(owner, name)  # AttributeError: the path changed, update the hooks

    @functools.wraps(original)
    def traced(*args: Any, **kwargs: Any) -> Any:
        stamp(f"{label} begins")
        try:
            return original(*args, **kwargs)
        finally:
            stamp(f"{label} ends")

    setattr(owner, name, traced)


def install() -> None:
    """In the daemon: hooks around the first token's path; a turn's stamps are written at its last frame."""
    import llama_cpp._internals

    from locod.daemon import decider, local, records, server, turn

    out = Path(os.environ["TRACE_FIRST_TOKEN_FILE"])
    _around(server.Daemon, "_dispatch", "loop: request parsed and handed to the pool")
    _around(turn.TurnRunner, "_assemble", "turn: session and attachments")
    _around(decider.Decider, "decide", "turn: decision")
    _around(local.LocalBackend, "fit", "turn: gate held, prompt fitted")
    _around(records.DecisionLog, "begin", "recorder: record begun (commit)")
    _around(local.LocalBackend, "_open", "turn: dialogue state and chat template")
    _around(llama_cpp._internals.LlamaContext, "decode", "llama.cpp: decode")
    post, send = server.Daemon._post, server.Daemon._send

    def traced_post(self: Any, peer: bytes, frame: bytes) -> None:
        stamp(f"{_kind(frame)} frame posted by a worker")
        if _kind(frame) in ("done", "error"):  # written before the client can see the turn end
            with out.open("a") as f:
                f.writelines(f"{label}\t{ns}\n" for label, ns in _stamps)
            _stamps.clear()
        post(self, peer, frame)

    def traced_send(self: Any, peer: bytes, frame: bytes) -> None:
        send(self, peer, frame)
        stamp(f"{_kind(frame)} frame sent by the loop")

    server.Daemon._post, server.Daemon._send = traced_post, traced_send


def _kind(frame: bytes) -> str:
    return frame.split(b'"type":"', 1)[1].split(b'"', 1)[0].decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from llama_cpp import Llama

    from locod.daemon.fetch import fetch
    from locod.protocol import DecisionFrame, DeltaFrame
    from tests.conftest import start_daemon

    models = REPO / "models"
    gguf = fetch("smollm2-135m-instruct", models, progress=lambda _: None)
    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=max(1, (os.cpu_count() or 2) // 2), verbose=False)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as home:
        hooks, trace = Path(home) / "hooks", Path(home) / "trace.tsv"
        hooks.mkdir()
        (hooks / "sitecustomize.py").write_text(
            f"import sys\nsys.path.insert(0, {str(REPO / 'scripts')!r})\nimport trace_first_token\n"
            "trace_first_token.install_when_imported()\n"
        )
        env = {"PYTHONPATH": str(hooks), "TRACE_FIRST_TOKEN_FILE": str(trace)}
        handle = start_daemon(Path(home) / "d", models, {"routing": {"mode": "local"}}, extra_env=env)
        client = handle.client()
        try:
            client.ask("warm up", max_tokens=4)
            trace.unlink(missing_ok=True)
            direct, turns = [], []
            for _ in range(args.rounds):
                started, first = time.perf_counter_ns(), None
                messages: Any = [{"role": "user", "content": PROMPT}]
                for chunk in llm.create_chat_completion(messages, max_tokens=8, temperature=0.0, seed=1, stream=True):
                    if first is None and chunk["choices"][0]["delta"].get("content"):  # type: ignore[index,union-attr]
                        first = time.perf_counter_ns()
                direct.append(((first or time.perf_counter_ns()) - started) / 1e6)
                seen: dict[str, int] = {"client: chat called": time.perf_counter_ns()}
                for frame in client.chat(PROMPT, max_tokens=8, temperature=0.0, seed=1):
                    if isinstance(frame, DecisionFrame | DeltaFrame):
                        seen.setdefault(f"client: {frame.type} frame received", time.perf_counter_ns())
                turns.append(seen)
        finally:
            handle.stop()
        lines = [line.split("\t") for line in trace.read_text().splitlines()]
    report(turns, lines, direct, load_before)


def report(turns: list[dict[str, int]], lines: list[list[str]], direct: list[float], load: Any) -> None:
    """Each stamp's first occurrence in a turn, as ms since the client's call; medians over the turns."""
    daemon: list[dict[str, int]] = [{}]
    for label, stamped in lines:
        daemon[-1].setdefault(label, int(stamped))
        if label.startswith(("done frame posted", "error frame posted")):
            daemon.append({})
    since: dict[str, list[float]] = collections.defaultdict(list)
    for client, inside in zip(turns, daemon, strict=False):
        start = client["client: chat called"]
        for step, ns in {**inside, **client}.items():
            since[step].append((ns - start) / 1e6)
    rows = sorted((statistics.median(v), k) for k, v in since.items() if len(v) == len(turns))
    print(f"{len(turns)} alternating rounds; load average before {load[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print("| step (first occurrence in a turn) | median ms since the client's call |\n|---|---|")
    for ms, label in rows:
        if not label.startswith(("done", "error")):
            print(f"| {label} | {ms:.2f} |")
    first = statistics.median(since["client: delta frame received"])
    print(f"| direct llama-cpp-python: first content chunk | {statistics.median(direct):.2f} |")
    print(f"| ratio daemon / direct, first token | {first / statistics.median(direct):.3f} |")


def install_when_imported() -> None:
    """From the daemon's sitecustomize: install the hooks once the daemon's modules are loaded."""
    import builtins

    real_import = builtins.__import__
    lock = threading.Lock()

    def importing(name: str, *args: Any, **kwargs: Any) -> Any:
        module = real_import(name, *args, **kwargs)
        server = sys.modules.get("locod.daemon.server")
        if server is not None and hasattr(server, "Daemon") and builtins.__import__ is importing:
            with lock:
                builtins.__import__ = real_import
                install()
        return module

    builtins.__import__ = importing


if __name__ == "__main__":
    main()
