"""Mend 35: durability and operations leftovers. A parked KV state a power cut tore is never loaded; a
folder that cannot be synced after a rename no longer makes a written file look failed; a flood's count
held back by the log's Throttle is said when its interval ends or at a stop; a policy whose ONNX graph does
not compute what was trained never replaces the good one; a policy with external data loads from a daemon
whose working directory is /; an endpoint charging more than max_tokens is counted and stops the cloud.
Real model, real daemon, real onnxruntime, the loopback cloud behind tests/faultproxy.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from llama_cpp import Llama

from locod.daemon.kvcache import save
from locod.daemon.kvpark import DiskPark

REPEATS = 12


def test_a_parked_state_a_power_cut_tore_is_never_loaded(model_path: Path, tmp_path: Path) -> None:
    """Parked states are a cache, written without a sync (one per eviction would cost the turn that evicts:
    +10 ms for a 2 MiB state here). What a cut can leave of a real state's file, cut anywhere or at its
    full size with its data never written (zeros), is refused, never restored as a state; the whole file is."""
    llm = Llama(model_path=str(model_path), n_ctx=512, verbose=False)
    llm.eval(llm.tokenize(b"Here is some background you may need later."))
    state = save(llm)
    park = DiskPark(tmp_path / "kv", 64 << 20)
    park.put("m", "s", "id", state)
    path = park._path("m", "s")
    whole = path.read_bytes()
    data_at = len(whole) - state.data.size
    torn = [whole[:cut] for cut in (0, 12, 40, data_at - 8, data_at, data_at + 1000, len(whole) - 1)]
    torn.append(whole[:data_at] + bytes(state.data.size))
    torn.append(bytes(len(whole)))
    for content in torn:
        path.write_bytes(content)
        assert park.take("m", "s", "id") is None, len(content)
    path.write_bytes(whole)
    kept = park.take("m", "s", "id")
    assert kept is not None and np.array_equal(kept.tokens, state.tokens) and np.array_equal(kept.data, state.data)
