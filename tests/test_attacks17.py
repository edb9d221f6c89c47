"""Attack round 17: the dialogue cache, parked states and the model zoo under pressure. Each test is a
place where a dialogue was answered from a KV state the weights serving it did not make, or where a kept
state was lost, or kept, against what the configuration says."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from locod.daemon.config import EMBEDDED_MODEL
from locod.daemon.kvpark import DiskPark, SavedState

from .conftest import write_config

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GREEDY = {"temperature": 0.0, "seed": 1}
FIRST = [{"role": "user", "content": "Tell me a fact about cats. " * 10}]


def with_other_rope_base(gguf: bytes) -> bytes:
    """The same GGUF but for its rope base (a float in the header): the same size and tensors, and other
    keys and values for the same tokens, as another fine-tune of the same base and quantisation has."""
    key = b"llama.rope.freq_base"
    at = gguf.index(key) + len(key)
    assert struct.unpack_from("<If", gguf, at) == (6, 100000.0)  # a float32 value
    changed = bytearray(gguf)
    struct.pack_into("<f", changed, at + 4, 10000.0)
    return bytes(changed)


@pytest.mark.parametrize("while_loaded", [False, True], ids=["replaced-while-stopped", "copied-over-while-loaded"])
def test_a_parked_state_is_restored_only_into_the_weights_that_made_it(
    daemon_factory: Any, models_dir: Path, tmp_path: Path, while_loaded: bool
) -> None:
    """A parked state was checked against the model's name, its file's size *now*, n_ctx and the llama.cpp
    build. So a restart onto another file of the same size (here the same weights under another rope
    base), or onto a new version copied over the file while the old one was loaded (its states were
    parked under the new file's size at shutdown), resumed the dialogue from keys and values the serving
    weights did not make, and answered otherwise than the same conversation read afresh. Now a state
    carries the fingerprint of the file as it was loaded, and one of other weights is refused with the
    documented log line."""
    model = tmp_path / "m.gguf"
    shutil.copy(models_dir / MODEL_FILE, model)
    variant = with_other_rope_base(model.read_bytes())
    if while_loaded:
        variant += bytes(4096)  # a new version of another size: the old check took the new size for it
    local = {"default": "m", "models": [{"name": "m", "path": str(model)}]}
    config = {"local": {**local, "cache_disk_mb": 64}, "routing": {"mode": "local"}}

    first = daemon_factory(config)
    answer = first.client().ask(messages=FIRST, session="s1", max_tokens=16, **GREEDY).text
    if while_loaded:
        model.write_bytes(variant)
    first.stop()
    if not while_loaded:
        model.write_bytes(variant)
    history = [*FIRST, {"role": "assistant", "content": answer}, {"role": "user", "content": "And another?"}]

    second = daemon_factory(config)
    client = second.client()
    resumed = client.ask(messages=history, session="s1", max_tokens=16, **GREEDY).text
    cache = client.status()["local"]["cache"]
    second.stop()
    assert cache["disk_hits"] == 0 and cache["misses"] == 1
    assert "ignoring parked KV state" in second.log() and "made by another model" in second.log()

    afresh = daemon_factory({"local": local, "routing": {"mode": "local"}}, name="afresh")
    assert resumed == afresh.client().ask(messages=history, session="s1", max_tokens=16, **GREEDY).text


def test_the_live_dialogue_of_a_model_unloaded_for_room_is_parked(daemon_factory: Any) -> None:
    """Loading a model evicts the kept states, parked with ``cache_disk_mb``, before it unloads another;
    but the dialogue live in the unloaded model's context was dropped unparked, so under a budget that
    holds one model at a time each switch of model cost that dialogue its whole history again."""
    both = [{"name": name, "path": MODEL_FILE} for name in ("m", "n")]  # one file under two names
    local = {"default": "m", "models": both, "memory_budget_mb": 200, "cache_mb": 16, "cache_disk_mb": 64}
    client = daemon_factory({"local": local, "routing": {"mode": "local"}}).client()
    client.ask(messages=FIRST, session="s1", model="m", max_tokens=4, **GREEDY)
    client.ask("Tell me a fact about dogs.", session="s2", model="n", max_tokens=4, **GREEDY)  # unloads m
    status = client.status()["local"]
    assert status["resident"] == ["n"] and status["cache"]["parked"]["dialogues"] == 1
    client.ask("And another?", session="s1", model="m", max_tokens=4, **GREEDY)  # unloads n, parks s2
    cache = client.status()["local"]["cache"]
    assert cache["disk_hits"] == 1 and cache["misses"] == 2


def test_a_reload_that_lowers_cache_mb_frees_the_kept_states_at_the_next_turn(daemon_factory: Any) -> None:
    """The kept states were brought within ``cache_mb`` only when another state was added, which a cache
    turned off (0) never does: after a reload to 0 they stayed in memory for good (status: two dialogues,
    6 MB, limit 0), and were still restored as hits of a cache that was off."""
    daemon = daemon_factory({"local": {"cache_mb": 64}})
    client = daemon.client()
    for session in ("s1", "s2", "s3"):
        client.ask(FIRST[0]["content"], session=session, max_tokens=2, **GREEDY)
    assert client.status()["local"]["cache"]["dialogues"] == 2
    write_config(daemon.config_path, {"local": {"cache_mb": 0}})
    assert client.reload()["reloaded"]
    client.ask("Say hi.", session="s4", max_tokens=2, **GREEDY)
    cache = client.status()["local"]["cache"]
    assert cache["dialogues"] == 0 and cache["mb"] == 0 and cache["limit_mb"] == 0
    client.ask("Say hi again.", session="s1", max_tokens=2, **GREEDY)
    assert client.status()["local"]["cache"]["hits"] == 0


def test_a_state_larger_than_the_park_is_said_once_and_wipes_no_other(daemon_factory: Any, tmp_path: Path) -> None:
    """A state larger than ``cache_disk_mb`` was dropped without a word (status: parked 0, no log line
    why); one within the limit by its data but over it with its header was written, and the trim that
    followed deleted every other parked state, then it."""
    daemon = daemon_factory({"local": {"cache_mb": 16, "cache_disk_mb": 1}})
    client = daemon.client()
    for session in ("s1", "s2"):  # about 2 MiB of keys and values each
        client.ask(FIRST[0]["content"] * 3, session=session, max_tokens=2, **GREEDY)
    daemon.stop()  # both are parked at shutdown, or would be
    assert daemon.log().count("larger than local.cache_disk_mb (1 MiB): states this large are not parked") == 1
    assert not list((daemon.home / "state" / "kvcache").glob("*.kv"))

    park = DiskPark(tmp_path / "kv", 1 << 20)
    small = SavedState(np.arange(10, dtype=np.intc), np.zeros(1000, dtype=np.uint8))
    park.put("m", "small", "identity", small)
    at_the_limit = SavedState(np.arange(10, dtype=np.intc), np.zeros((1 << 20) - 40, dtype=np.uint8))
    park.put("m", "large", "identity", at_the_limit)
    kept = park.take("m", "small", "identity")
    assert kept is not None and kept.tokens.tolist() == list(range(10))


def test_a_directory_in_a_parked_states_place_is_not_said_removed(daemon_factory: Any) -> None:
    """A directory where a session's state would be parked is not ours to remove, and is not; the log line
    said it was, at every turn that looked for the state."""
    daemon = daemon_factory({"local": {"cache_disk_mb": 64}})
    park = DiskPark(daemon.home / "state" / "kvcache", 64 << 20)
    in_place = park._path(EMBEDDED_MODEL.name, "ipc:s1")
    in_place.mkdir()
    done = daemon.client().ask("Say hello.", session="s1", max_tokens=2, **GREEDY).done
    assert done is not None and done.outcome == "ok"
    said = [line for line in daemon.log().splitlines() if "ignoring parked KV state" in line]
    assert len(said) == 1 and said[0].endswith("; left in place") and in_place.is_dir()


def test_a_cache_of_one_state_serves_two_dialogues_taking_turns(daemon_factory: Any) -> None:
    """One dialogue is always live in the model's context, so a cache holding one state is enough for two
    dialogues taking turns. But the outgoing state entered the cache before the incoming one left it: over
    the limit, the oldest went, which was the incoming one, so every turn read its whole history again."""
    client = daemon_factory({"local": {"cache_mb": 2}}).client()  # about 1.5 MiB a dialogue here
    for session, text in zip("ABABA", ["Tell me a fact about cats. " * 3] * 2 + ["More?"] * 3):
        client.ask(text, session=session, max_tokens=2, **GREEDY)
    cache = client.status()["local"]["cache"]
    assert cache["misses"] == 2 and cache["hits"] == 3 and cache["evictions"] == 0 and cache["dialogues"] == 1
