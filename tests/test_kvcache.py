"""Each dialogue's KV state kept between its turns: the real embedded model, no daemon in between
(but for the status check at the end)."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from locod.daemon.backends import Prompt
from locod.daemon.config import EMBEDDED_MODEL
from locod.daemon.kvpark import DiskPark
from locod.daemon.local import LocalBackend, ModelZoo

from .conftest import DaemonHandle

MODEL = EMBEDDED_MODEL.name
TOPICS = {"A": "cats", "B": "rivers", "C": "bridges"}
# About 200 tokens: a dialogue's first state is then several MB, so a budget of a few MB holds one.
LONG = "Here is some background you may need later. " * 20


@pytest.fixture
def zoos(models_dir: Path) -> Iterator[Any]:
    made: list[ModelZoo] = []

    def make(cache_mb: int, park: DiskPark | None = None, n_ctx: int = 2048) -> LocalBackend:
        zoo = ModelZoo([dataclasses.replace(EMBEDDED_MODEL, n_ctx=n_ctx)], models_dir, 4096, 0, cache_mb, park)
        made.append(zoo)
        return LocalBackend(zoo)

    yield make
    for zoo in made:
        zoo.close()


def turn(backend: LocalBackend, history: dict[str, list[dict[str, str]]], session: str, text: str) -> str:
    """One greedy turn of ``session``; its history grows by the exchange."""
    messages = [*history.setdefault(session, []), {"role": "user", "content": text}]
    prompt = Prompt(list(messages), 12, 0.0, 1, lambda _: None, session=session)
    answer = backend.generate(MODEL, backend.fit(MODEL, prompt)).text
    history[session] = [*messages, {"role": "assistant", "content": answer}]
    return answer


def interleave(backend: LocalBackend, rounds: int, sessions: str = "AB", first: str = "") -> list[str]:
    history: dict[str, list[dict[str, str]]] = {}
    return [
        turn(backend, history, s, f"{first if r == 0 else ''}Tell me fact {r + 1} about {TOPICS[s]}.")
        for r in range(rounds)
        for s in sessions
    ]


def test_interleaved_dialogues_answer_exactly_as_each_alone(zoos: Any) -> None:
    """With the cache, taking turns changes no answer: each dialogue gets what it gets running alone.

    (Alone, llama-cpp-python reuses the context's prefix already; without the cache, interleaving makes
    each turn re-read its history in one batch, which llama.cpp's CPU kernels may round differently.)"""
    cached, alone = zoos(cache_mb=64), zoos(cache_mb=0)
    answers = interleave(cached, 3)
    assert answers[0::2] == interleave(alone, 3, "A") and answers[1::2] == interleave(alone, 3, "B")
    # Each dialogue's later turns started from its own state: hits, no misses beyond the two first turns.
    status = cached.zoo.cache.status()
    assert status["hits"] == 4 and status["misses"] == 2 and status["dialogues"] == 1
    assert alone.zoo.cache.status()["dialogues"] == 0


def test_a_dialogue_trimmed_to_its_context_still_answers_as_alone(zoos: Any) -> None:
    """Past the context, the oldest messages go; the kept state then shares only the system prompt with
    the trimmed prompt, and the turn reads the rest as it would alone."""
    cached, alone = zoos(cache_mb=64, n_ctx=256), zoos(cache_mb=0, n_ctx=256)
    answers = interleave(cached, 3, first=LONG)
    assert answers[0::2] == interleave(alone, 3, "A", LONG) and answers[1::2] == interleave(alone, 3, "B", LONG)


def test_a_restored_dialogue_holds_its_own_history(zoos: Any) -> None:
    backend = zoos(cache_mb=64)
    llm = backend.zoo.get(MODEL).llm
    history: dict[str, list[dict[str, str]]] = {}
    turn(backend, history, "A", "Tell me about cats.")
    held = llm.input_ids[: llm.n_tokens].tolist()
    turn(backend, history, "B", "Tell me about rivers.")
    backend.zoo.cache.begin_turn(MODEL, llm, "A")
    assert llm.input_ids[: llm.n_tokens].tolist() == held


def test_eviction_keeps_the_states_within_cache_mb(zoos: Any) -> None:
    backend = zoos(cache_mb=8)
    interleave(backend, 1, "ABC", LONG)
    interleave(backend, 1, "A", LONG)
    status = backend.zoo.cache.status()
    # B's state evicted A's, C's evicted B's: A's second turn found nothing kept.
    assert status["evictions"] == 2 and status["hits"] == 0 and status["misses"] == 4
    assert status["dialogues"] == 1 and 0 < status["mb"] <= 8


def test_states_and_models_share_the_zoo_budget(zoos: Any) -> None:
    backend = zoos(cache_mb=1000)
    footprint = backend.zoo.get(MODEL).footprint_mb
    backend.zoo.budget_mb = int(footprint) + 9  # room for one long dialogue's state beside the model
    interleave(backend, 1, "ABC", LONG)
    status = backend.zoo.cache.status()
    assert status["evictions"] == 1 and status["dialogues"] == 1
    assert footprint + backend.zoo.cache.mb <= backend.zoo.budget_mb
    assert backend.zoo.resident() == [MODEL]


def test_parked_states_resume_and_a_corrupt_one_is_ignored(
    zoos: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    park = DiskPark(tmp_path / "kv", 256 << 20)
    first = zoos(cache_mb=64, park=park)
    history: dict[str, list[dict[str, str]]] = {}
    for session in "AB":
        turn(first, history, session, f"Tell me about {TOPICS[session]}.")
    first.zoo.close()  # as at shutdown: A's kept state and B's live one are parked
    files = sorted((tmp_path / "kv").glob("*.kv"))
    assert len(files) == 2
    a_file = park._path(MODEL, "A")
    raw = bytearray(a_file.read_bytes())
    raw[-100] ^= 0xFF
    a_file.write_bytes(bytes(raw))

    second = zoos(cache_mb=64, park=DiskPark(tmp_path / "kv", 256 << 20))
    with caplog.at_level(logging.WARNING, logger="locod.daemon.kvpark"):
        resumed = [turn(second, dict(history), s, "And one more fact?") for s in "AB"]
    # A re-read its history into an empty context; B went on from its parked state, as if never parked.
    expected_a = turn(zoos(cache_mb=0), dict(history), "A", "And one more fact?")
    replay = zoos(cache_mb=0)
    replayed: dict[str, list[dict[str, str]]] = {}
    for session in "AB":
        turn(replay, replayed, session, f"Tell me about {TOPICS[session]}.")
    assert resumed == [expected_a, turn(replay, replayed, "B", "And one more fact?")]
    status = second.zoo.cache.status()
    assert status["disk_hits"] == 1 and status["misses"] == 1  # B resumed from disk, A's file was refused
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "checksum mismatch" in warnings[0]
    assert not a_file.exists()


def test_a_truncated_or_foreign_parked_file_is_ignored(models_dir: Path, tmp_path: Path) -> None:
    park = DiskPark(tmp_path / "kv", 1 << 20)
    path = park._path(MODEL, "A")
    for content in (b"", b"LOCODKV1\x05\x00\x00\x00{}", b"not a state at all" * 10):
        path.write_bytes(content)
        assert park.take(MODEL, "A", "identity") is None
        assert not path.exists()


def test_a_parked_file_is_read_only_when_regular_and_within_the_limit(models_dir: Path, tmp_path: Path) -> None:
    """A FIFO would hold the turn (and the local model) for good, /dev/zero or a huge file fill the memory,
    a symlink read what it points at: each is refused unread and removed."""
    park = DiskPark(tmp_path / "kv", 1 << 20)
    path = park._path(MODEL, "A")
    target = tmp_path / "elsewhere.kv"
    target.write_bytes(b"LOCODKV1")
    for make in (os.mkfifo, lambda p: p.symlink_to("/dev/zero"), lambda p: p.symlink_to(target)):
        make(path)
        assert park.take(MODEL, "A", "identity") is None
        assert not path.is_symlink() and not path.exists()
    with path.open("wb") as f:
        f.truncate(4 << 30)  # sparse: 4 GiB that would be read whole
    assert park.take(MODEL, "A", "identity") is None and not path.exists()
    assert target.exists()


def test_a_fifo_parked_under_a_session_does_not_wedge_the_local_model(daemon_factory: Any) -> None:
    daemon = daemon_factory({"local": {"cache_disk_mb": 64}})
    park = DiskPark(daemon.home / "state" / "kvcache", 64 << 20)
    os.mkfifo(park._path(MODEL, "ipc:s1"))  # where the ipc door's session s1 would be parked
    done = daemon.client().ask("Say hello.", session="s1", max_tokens=2).done
    assert done is not None and done.outcome == "ok"
    assert "ignoring parked KV state" in daemon.log() and "not a regular file" in daemon.log()


def test_status_reports_the_dialogue_cache(daemon: DaemonHandle) -> None:
    client = daemon.client()
    for session in ("s1", "s2", "s1"):
        client.ask("Say hello.", session=session, max_tokens=4, temperature=0.0, seed=1)
    cache = client.status()["local"]["cache"]
    assert cache["hits"] == 1 and cache["misses"] == 2 and cache["dialogues"] == 1
    assert 0 < cache["mb"] <= cache["limit_mb"]


def test_a_one_off_turn_keeps_no_state(daemon: DaemonHandle) -> None:
    """A turn without a session cannot come back: its state is not kept, so it evicts no dialogue's."""
    client = daemon.client()
    client.ask("Say hello.", session="s1", max_tokens=4, temperature=0.0, seed=1)
    for _ in range(2):
        client.ask("Say goodbye.", max_tokens=4, temperature=0.0, seed=1)
    client.ask("Say hello again.", session="s1", max_tokens=4, temperature=0.0, seed=1)
    cache = client.status()["local"]["cache"]
    assert cache["hits"] == 1 and cache["misses"] == 1 and cache["dialogues"] == 0


def test_a_turn_cancelled_while_waiting_leaves_the_holders_answer_alone(zoos: Any) -> None:
    """A queued turn whose client leaves gives up its place without the gate: the turn holding the model
    still gets exactly its own answer (never two readers on one context)."""
    messages = [{"role": "user", "content": LONG + "Tell me a fact about cats."}]
    other = zoos(0)
    alone = other.generate(MODEL, other.fit(MODEL, Prompt(list(messages), 12, 0.0, 1, lambda _: None))).text
    backend = zoos(0)  # a fresh context: the whole prompt is read, which takes a while
    gone = threading.Event()
    gone.set()
    with backend.slot("holder", threading.Event()) as granted:
        assert granted
        prompt = backend.fit(MODEL, Prompt(list(messages), 12, 0.0, 1, lambda _: None))

        def leave() -> None:
            with backend.slot("leaver", gone) as waited:
                assert not waited

        leaver = threading.Thread(target=leave)
        leaver.start()
        time.sleep(0.02)  # it has given up its place, while the holder's prompt is still being read
        answer = backend.generate(MODEL, prompt).text
        leaver.join(10)
    assert answer == alone
