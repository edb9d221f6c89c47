"""Mend 35: durability and operations leftovers. A parked KV state a power cut tore is never loaded; a
folder that cannot be synced after a rename no longer makes a written file look failed; a flood's count
held back by the log's Throttle is said when its interval ends or at a stop; a policy whose ONNX graph does
not compute what was trained never replaces the good one; a policy with external data loads from a daemon
whose working directory is /; an endpoint charging more than max_tokens is counted and stops the cloud.
Real model, real daemon, real onnxruntime, the loopback cloud behind tests/faultproxy.py."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from llama_cpp import Llama

from locod.daemon.kvcache import save
from locod.daemon.kvpark import DiskPark
from locod.daemon.logs import Throttle
from locod.policy.observation import N_ACTIONS, OBS_DIM
from locod.policy.onnx_policy import DEFAULT_POLICY, OnnxPolicy

from .conftest import SECRET, DaemonHandle, Lines, wait_for
from .faultproxy import Fault, FaultProxy
from .test_attacks31 import CAP, MAX_TOKENS, capped_config, spent_in_log

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


def test_a_flood_that_stopped_has_its_count_said_when_its_interval_ends() -> None:
    """A Throttle said how many lines it held back only with the next line of that kind: after a flood that
    stopped, the count was never logged. Now the interval's latest line is logged when it ends, with the
    count of the others; every line is logged or counted once."""
    logger = logging.getLogger("locod.test.mend35")
    lines = Lines()
    logger.addHandler(lines)
    try:
        throttle = Throttle(logger, every_s=0.5)
        for i in range(REPEATS):
            throttle.say("disk", logging.WARNING, "could not write %d", i)
        wait_for(lambda: len(lines.said) == 2, 30, "the interval's held-back line")
        last = f"could not write {REPEATS - 1} ({REPEATS - 2} more since the last such line)"
        assert lines.said == ["could not write 0", last]
        throttle.say("disk", logging.WARNING, "could not write %d", REPEATS)  # within the new interval: held
        throttle.flush()
        assert lines.said[2:] == [f"could not write {REPEATS}"]  # one line held: no count to add
    finally:
        logger.removeHandler(lines)


def test_a_flood_held_back_at_a_stop_has_its_count_in_the_log(daemon_factory: Any) -> None:
    """The same config rejected on every reload is logged once a minute; a daemon stopped within that
    minute lost the count of the rejections it held back. Now the stop logs it, before "stopped after"."""
    handle = daemon_factory({})
    handle.config_path.write_text("[routing]\nsla = 9\n")
    client = handle.client()
    for _ in range(REPEATS):
        assert client.reload()["reloaded"] is False
    assert handle.stop() == 0
    said = [line for line in handle.log().splitlines() if "reload rejected" in line]
    assert len(said) == 2, said
    assert said[1].endswith(f"({REPEATS - 2} more since the last such line)"), said[1]
    assert handle.log().rstrip().endswith("stopped after 0 turns")


torch = pytest.importorskip("torch")
from locod.policy.train import PARITY_TOLERANCE, Policy, TrainConfig, export  # noqa: E402


class TracedWrong(Policy):
    """A policy whose exported graph differs from what it computes: the export traces the example's
    all-zero observation, where this branch is not taken; the parity check's observations take it."""

    def forward(self, observation: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        log_probs = super().forward(observation, mask)
        if bool(observation.sum() > 0):
            return torch.log_softmax(log_probs * 0.5, dim=-1)
        return log_probs


def test_a_policy_whose_graph_fails_the_parity_check_leaves_the_good_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`locod policy train` exported over policy.onnx and only then checked the graph against the trained
    policy: a failed check left the wrong graph where the daemon loads it (at its next start or SIGHUP). Now
    the graph is checked beside it and renamed over it only when it matches."""
    path = tmp_path / "policy.onnx"
    good = Policy()
    assert export(good, path, version="good", data_sha256="0" * 64, config=TrainConfig()) < PARITY_TOLERANCE
    before = path.read_bytes()
    torch.manual_seed(3)
    diff = export(TracedWrong(), path, version="wrong", data_sha256="0" * 64, config=TrainConfig())
    assert diff >= PARITY_TOLERANCE
    assert path.read_bytes() == before and OnnxPolicy(path).version == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.onnx"]  # no temp file left either


def test_a_policy_with_its_weights_in_a_side_file_loads_from_a_daemon_in_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A policy saved with ONNX external data (weights in a side file beside it) was loaded from its bytes,
    so onnxruntime looked for the side file in the working directory: a daemon run by systemd (cwd /)
    refused it. Now the side file is read from the policy's folder, and it decides as the same policy saved
    whole."""
    import onnx

    model = onnx.load(str(DEFAULT_POLICY))
    path = tmp_path / "policy.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="policy.weights", size_threshold=0)
    assert (tmp_path / "policy.weights").stat().st_size > 0
    monkeypatch.chdir("/")
    split, whole = OnnxPolicy(path), OnnxPolicy(DEFAULT_POLICY)
    observation = np.random.default_rng(35).random(OBS_DIM, dtype=np.float32)
    mask = np.ones(N_ACTIONS, dtype=np.float32)
    assert np.array_equal(split.log_probs(observation, mask), whole.log_probs(observation, mask))


@pytest.fixture
def capped(daemon_factory: Any, proxy: FaultProxy) -> DaemonHandle:
    """A daemon whose turns go to the cloud under a cap of two and a half turns' worst case (test_attacks31)."""
    return daemon_factory(capped_config(proxy.base_url), extra_env={"LOCOD_CLOUD_API_KEY": SECRET})  # type: ignore[no-any-return]


def test_an_endpoint_charging_past_max_tokens_is_counted_and_stops_the_cloud(
    capped: DaemonHandle, proxy: FaultProxy
) -> None:
    """An endpoint reporting more completion tokens than max_tokens asked (here ten times, within what
    usage is believed up to) bills a turn past what the cap admitted it at. What it billed is counted, not
    clipped to what was asked: today's spend passes the cap, and every cloud turn after it is kept local,
    told why, until local midnight."""
    proxy.set(Fault("usage", usage={"prompt_tokens": 10, "completion_tokens": 10 * MAX_TOKENS, "total_tokens": 90}))
    client = capped.client()
    assert client.ask("Say one word.", max_tokens=MAX_TOKENS).decision.location == "cloud"
    billed = 10 * MAX_TOKENS * 1000 / 1e6
    assert spent_in_log(capped) == pytest.approx(billed) and billed > CAP
    status = client.status()["cloud"]
    assert status["spent_today_usd"] == pytest.approx(billed)
    after = client.ask("Say one word.", max_tokens=MAX_TOKENS, force="cloud")
    assert after.decision.location == "local"
    assert "reached the cap" in (after.decision.notice or ""), after.decision.notice
    assert len(proxy.chat_requests()) == 1
    assert (
        "cap: passed by $0.06 (4.0 times the cap), the cloud is off until local midnight" in capped.cli("status").stdout
    )
