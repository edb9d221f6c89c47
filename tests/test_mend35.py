"""Mend 35: durability and operations leftovers. A parked KV state a power cut tore is never loaded; a
folder that cannot be synced after a rename no longer makes a written file look failed; a flood's count
held back by the log's Throttle is said when its interval ends or at a stop; a policy whose ONNX graph does
not compute what was trained never replaces the good one; a policy with external data loads from a daemon
whose working directory is /; an endpoint charging more than max_tokens is counted and stops the cloud.
Real model, real daemon, real onnxruntime, the loopback cloud behind tests/faultproxy.py."""

from __future__ import annotations

import subprocess
import sys
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


RENAME_WITHOUT_A_DESCRIPTOR_LEFT = """
import resource, sys
from pathlib import Path
from locod.daemon.regular_file import replace_on_disk
folder = Path(sys.argv[1])
(folder / "new.tmp").write_bytes(b"new")
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
held = []
try:
    while True:
        held.append(open("/dev/null"))
except OSError:
    pass
replace_on_disk(folder / "new.tmp", folder / "state")
print("returned")
"""


def test_a_folder_that_cannot_be_synced_after_the_rename_is_said_not_raised(tmp_path: Path) -> None:
    """``replace_on_disk`` renamed, then raised when the folder could not be opened to sync (here: no
    descriptor left, EMFILE; an EIO from the sync itself, which cannot be caused for real here, takes the
    same path): its caller reported a failed write while the new file was in place (`models pull` left a
    model no catalog entry named). Now the rename stands, as it does for every reader, and the log says the
    folder was not synced."""
    (tmp_path / "state").write_bytes(b"old")
    script = tmp_path / "rename.py"
    script.write_text(RENAME_WITHOUT_A_DESCRIPTOR_LEFT)
    run = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "returned", run.stderr
    assert (tmp_path / "state").read_bytes() == b"new" and not (tmp_path / "new.tmp").exists()
    assert "state is written, but its folder could not be synced" in run.stderr and "Too many open files" in run.stderr
