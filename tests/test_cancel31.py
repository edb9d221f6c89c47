"""A cancel stops a local prompt's reading between llama.cpp's batches (daemon/prompt_reading.py): the real
embedded model, in-process and behind the real daemon."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from locod.daemon.backends import Prompt
from locod.daemon.config import EMBEDDED_MODEL
from locod.daemon.local import LocalBackend, ModelZoo

from .conftest import Context, DaemonHandle, wait_for
from .test_attacks14 import dealer, receive, send, status

MODEL = EMBEDDED_MODEL.name
# About 1,800 tokens of the embedded model's: four of llama.cpp's 512-token batches.
DOCUMENT = "".join(f"Line {i}: the ferry leaves pier {i % 7} at {i % 12} o'clock with {i} crates.\n" for i in range(70))
QUESTION = f"{DOCUMENT}\nWhich pier does the ferry of line 42 leave from?"


class CancelledAfter(threading.Event):
    """A cancel that lands after ``looks`` looks at it: the prompt's reading stops at a known batch."""

    def __init__(self, looks: int) -> None:
        super().__init__()
        self.looks = looks

    def is_set(self) -> bool:
        self.looks -= 1
        return self.looks < 0 or super().is_set()


@pytest.fixture
def backend(models_dir: Path) -> Iterator[Any]:
    made: list[ModelZoo] = []

    def make() -> LocalBackend:
        zoo = ModelZoo([dataclasses.replace(EMBEDDED_MODEL, n_ctx=4096)], models_dir, 4096, 0, 64)
        made.append(zoo)
        return LocalBackend(zoo)

    yield make
    for zoo in made:
        zoo.close()


def answer(backend: LocalBackend, text: str, session: str, cancelled: threading.Event | None = None) -> Any:
    prompt = Prompt([{"role": "user", "content": text}], 16, 0.0, 1, lambda _: None, session=session)
    if cancelled is not None:
        prompt = dataclasses.replace(prompt, cancelled=cancelled)
    return backend.generate(MODEL, backend.fit(MODEL, prompt))


def test_a_cancel_stops_the_prompt_reading_and_what_was_read_is_reused_exactly(backend: Any) -> None:
    """The cancel was looked at only between streamed tokens, and llama.cpp reads the prompt in one call: a
    cancelled turn held the model until its whole prompt was read. Now the reading stops before the next
    batch; the context keeps the batches read, and the next turn's prefix match starts from them: the same
    prompt then answers at temperature 0 exactly as on a context that never saw the cancel, and so does
    another dialogue, whose turn saves the cut state."""
    cut, fresh = backend(), backend()
    stopped = answer(cut, QUESTION, "A", CancelledAfter(2))  # two batches read, the third not begun
    llm = cut.zoo.get(MODEL).llm
    assert stopped.cancelled and stopped.text == "" and stopped.tokens_out == 0
    assert llm.n_tokens == 2 * llm.n_batch  # read, and no further
    readings = cut.stopped_readings
    assert readings.turns == 1 and readings.tokens_unread > llm.n_batch  # the rest of the prompt
    assert "eval" not in vars(llm)  # the next turn reads with llama.cpp's own eval

    expected = answer(fresh, QUESTION, "A").text
    assert expected and answer(cut, QUESTION, "A").text == expected
    other = "Name a colour of the sky."
    assert answer(cut, other, "B").text == answer(fresh, other, "B").text
    assert cut.stopped_readings.turns == 1  # a reading not cancelled is not counted


def test_a_stream_never_read_leaves_the_model_its_own_eval(backend: Any) -> None:
    """A turn cancelled before its first chunk never calls eval: the shadowing must not outlive it (the next
    turn would read with the old turn's cancel)."""
    local = backend()
    gone = threading.Event()
    gone.set()
    first = answer(local, "Say hi.", "A", gone)
    assert first.cancelled and local.stopped_readings.turns == 1  # stopped before its first batch
    assert "eval" not in vars(local.zoo.get(MODEL).llm)
    assert answer(local, "Say hi.", "A").text


LONG_PROMPT = DOCUMENT * 8 + "\nWhich pier does the ferry of line 42 leave from?"  # about 14,000 tokens


def long_context_daemon(daemon_factory: Any, **daemon: Any) -> DaemonHandle:
    model = {"name": MODEL, "path": "SmolLM2-135M-Instruct.Q4_1.gguf", "n_ctx": 16384}
    return daemon_factory({"daemon": daemon, "local": {"n_threads": 1, "models": [model]}})


def test_a_client_that_hangs_up_during_a_long_prompt_frees_the_model_for_the_next(
    daemon_factory: Any, ctx: Context
) -> None:
    """Measured: a forced-local 1,848-token prompt whose client left after its `decision` frame stayed in flight
    94 s on a loaded 2-core machine, the model held from every other client, before it was recorded
    `cancelled`. Now its reading stops within a batch of the hang-up: the turn queued behind it is answered,
    the cancelled one recorded `cancelled` once, and status counts the tokens its reading left unread."""
    handle = long_context_daemon(daemon_factory)
    leaver = dealer(handle, ctx)
    send(leaver, "leaver", "chat", prompt=LONG_PROMPT, options={"force": "local", "max_tokens": 8})
    assert receive(leaver)["type"] == "decision"  # accepted, its prompt being read
    waiter = dealer(handle, ctx)
    send(waiter, "waiter", "chat", prompt="Say hi.", options={"force": "local", "max_tokens": 4})
    wait_for(lambda: status(handle, ctx)["queue"]["waiting_for_local"] == 1, 120, "the second turn to queue")
    leaver.close()

    frames = [receive(waiter)]
    while frames[-1]["type"] not in ("done", "error"):
        frames.append(receive(waiter))
    assert frames[-1]["type"] == "done", frames[-1]
    stopped = status(handle, ctx)["local"]["prompts_stopped"]
    assert stopped["turns"] == 1 and stopped["tokens_unread"] > 0  # its reading stopped short of the end
    wait_for(lambda: status(handle, ctx)["queue"]["in_flight"] == 0, 120, "both turns to end")
    assert sorted((r["request_id"], r["outcome"]) for r in handle.rows()) == [("leaver", "cancelled"), ("waiter", "ok")]


def test_a_stop_past_the_grace_frees_the_model_within_a_batch(daemon_factory: Any, ctx: Context) -> None:
    """A SIGTERM cancels the turns still running once the grace is over: a local one went on reading its
    prompt to the end before the daemon could exit (past systemd's TimeoutStopSec for a long document on a
    laptop, a kill). Its reading now stops within a batch: the log says how many tokens were left unread,
    and the turn is recorded `cancelled`."""
    handle = long_context_daemon(daemon_factory, shutdown_grace_s=0.0)
    client = dealer(handle, ctx)
    send(client, "long", "chat", prompt=LONG_PROMPT, options={"force": "local", "max_tokens": 8})
    assert receive(client)["type"] == "decision"
    assert handle.stop(timeout=600) == 0
    assert "freed the local model" in handle.log() and "prompt tokens unread" in handle.log()
    assert [(r["request_id"], r["outcome"]) for r in handle.rows()] == [("long", "cancelled")]
