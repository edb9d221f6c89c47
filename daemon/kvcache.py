"""Each dialogue's KV state, kept between its turns, so a turn reads only its new tokens.

A loaded model has one live context. llama-cpp-python reuses it when the next prompt starts with the
tokens it holds: enough for one dialogue, useless when two take turns, where every turn would re-read its
whole history. So when a turn of another session takes the model, the live state of the session that had
it is saved (llama.cpp's sequence 0 only: its size grows with the tokens held, not with the context), and
the incoming session's own state, if kept, is restored; the prefix match then starts from that dialogue's
history. Saved states are evicted least recently used within ``local.cache_mb`` and within the room the
model zoo's memory budget leaves (one accounting: loading a model evicts states first); evicted states go
to the disk park when one is configured.
"""

from __future__ import annotations

import ctypes
import threading
from collections import OrderedDict
from collections.abc import Callable

import llama_cpp
import numpy as np
from llama_cpp import Llama

from locod.daemon.kvpark import DiskPark, SavedState

SEQ = 0  # llama-cpp-python's high-level API keeps its one sequence here
BYTES = ctypes.POINTER(ctypes.c_uint8)
Key = tuple[str, str]  # (model, session)


def save(llm: Llama) -> SavedState:
    """Copy the live sequence out of the context (into memory left uninitialised: it is overwritten)."""
    size = llama_cpp.llama_state_seq_get_size(llm.ctx, SEQ)
    data = np.empty(size, dtype=np.uint8)
    written = llama_cpp.llama_state_seq_get_data(llm.ctx, data.ctypes.data_as(BYTES), size, SEQ)
    return SavedState(llm.input_ids[: llm.n_tokens].copy(), data[:written])


def restore(llm: Llama, state: SavedState) -> bool:
    """Make ``state`` the live sequence; False (and an empty context) if llama.cpp refuses it."""
    n = len(state.tokens)
    data = state.data
    if n > llm.n_ctx() or not llama_cpp.llama_state_seq_set_data(llm.ctx, data.ctypes.data_as(BYTES), data.size, SEQ):
        llm.reset()
        return False
    llm.input_ids[:n] = state.tokens
    llm.n_tokens = n
    # The restored logits are not the last token's: make llama-cpp-python decode at least one token again.
    llm._requires_eval = True
    return True


class DialogueCache:
    def __init__(
        self, limit_mb: float, room_mb: Callable[[], float], park: DiskPark | None, identity: Callable[[str], str]
    ) -> None:
        """``room_mb``: what the zoo's budget leaves beside the loaded models; ``identity(model)``: what a
        parked state must have been made by (the loaded model's weights, context size, llama.cpp build; ""
        for a model not loaded)."""
        self.limit_mb = limit_mb
        self.room_mb = room_mb
        self.park = park
        self.identity = identity
        self._entries: OrderedDict[Key, SavedState] = OrderedDict()
        self._live: dict[str, str] = {}  # model -> session whose state the context holds
        self._bytes = 0
        self._lock = threading.Lock()  # status() reads from the loop thread while a turn runs
        self.hits = self.disk_hits = self.misses = self.evictions = 0

    @property
    def mb(self) -> float:
        return self._bytes / 2**20

    def begin_turn(self, model: str, llm: Llama, session: str | None) -> None:
        """Give ``llm`` this session's own state before its prompt is evaluated. A prompt of no session
        (a shadow answer) only has the live state kept for the session that owned it. The kept states are
        first brought within ``cache_mb`` and the budget's room, which a reload may have lowered (the incoming
        one among them: after a reload to 0 none is restored from memory); the incoming state then leaves the
        cache, or the disk park, before the outgoing one enters the cache, so it is never evicted, nor its
        parked file trimmed, to make room for that (a cache holding one state serves two dialogues taking
        turns)."""
        self._trim()
        owner = self._live.get(model)
        if owner == session and session is not None:
            self.hits += 1
            return
        state, from_disk = (None, False) if session is None else self._take(model, session)
        if owner is not None and self.limit_mb > 0:
            self._put((model, owner), save(llm))
            self._trim()
        self._live.pop(model, None)
        if session is None:
            return
        self._live[model] = session
        if state is not None and restore(llm, state):
            self.hits += 1
            self.disk_hits += from_disk
        else:
            self.misses += 1

    def forget_live(self, model: str, llm: Llama) -> None:
        """The model is being unloaded (for room, or at shutdown): its live state goes to the disk park, when
        there is one, as an evicted state does."""
        owner = self._live.pop(model, None)
        identity = self.identity(model)
        if owner is not None and self.park is not None and identity and llm.n_tokens:
            self.park.put(model, owner, identity, save(llm))

    def drop_model(self, model: str) -> None:
        """Forget every state of a model that was unloaded because its configuration changed."""
        self._live.pop(model, None)
        with self._lock:
            for key in [k for k in self._entries if k[0] == model]:
                self._bytes -= self._entries.pop(key).nbytes

    def evict_oldest(self) -> bool:
        """Drop (or park) the least recently used state; False when there is none."""
        with self._lock:
            if not self._entries:
                return False
            key, state = self._entries.popitem(last=False)
            self._bytes -= state.nbytes
            self.evictions += 1
        identity = self.identity(key[0])
        if self.park is not None and identity:
            self.park.put(*key, identity, state)
        return True

    def park_all(self) -> None:
        """At shutdown: every kept state to the disk park (when there is one)."""
        while self.park is not None and self.evict_oldest():
            pass

    def _take(self, model: str, session: str) -> tuple[SavedState | None, bool]:
        """The session's kept state, out of memory or else out of the disk park; and whether it was looked
        for on disk."""
        with self._lock:
            state = self._entries.pop((model, session), None)
            if state is not None:
                self._bytes -= state.nbytes
                return state, False
        if self.park is None:
            return None, False
        return self.park.take(model, session, self.identity(model)), True

    def _put(self, key: Key, state: SavedState) -> None:
        with self._lock:
            self._entries[key] = state
            self._bytes += state.nbytes

    def holdable_mb(self) -> float:
        """What the cache may hold now: ``limit_mb`` (``local.cache_mb``), or less where the loaded models leave
        the memory budget less room."""
        return max(0.0, min(self.limit_mb, self.room_mb()))

    def _trim(self) -> None:
        while self._entries and self.mb > self.holdable_mb():
            self.evict_oldest()

    def status(self) -> dict[str, object]:
        """Its ``limit_mb`` is ``holdable_mb``: the configured figure alone promised room that was not there."""
        holdable_mb = self.holdable_mb()
        with self._lock:
            status: dict[str, object] = {
                "dialogues": len(self._entries),
                "mb": round(self.mb, 1),
                "limit_mb": round(holdable_mb, 1),
                "hits": self.hits,
                "disk_hits": self.disk_hits,
                "misses": self.misses,
                "evictions": self.evictions,
            }
        if self.park is not None:
            files, size = self.park.usage()
            status["parked"] = {"dialogues": files, "mb": round(size / 2**20, 1)}
        return status
