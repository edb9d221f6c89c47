"""Review 41: the session's changes checked where they meet: the command line's new usage errors (a flag
before an unknown command, a valued option before an action), and the ipc socket's eviction of the greediest
process against a turn in flight (real ZeroMQ, the owner's processes, the loopback cloud behind the fault
proxy)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from typing import Any

import pytest

from locod import cli

from .conftest import SECRET, DaemonHandle, cloud_config, wait_for
from .faultproxy import Fault, FaultProxy

# A long-lived process of the owner's holding a pool of clients, each of which has asked (so vouched for): with
# "ask", the first, its oldest connection, asks a turn that the cloud holds; once routed it says "answering",
# and at the end how the turn ended.
POOL = """
import sys, time
from locod.client import Client
from locod.errors import LocodError
pool = [Client(sys.argv[1], timeout_s=10, turn_timeout_s=60) for _ in range(int(sys.argv[2]))]
for client in pool:
    client.ping()
if sys.argv[3] == "ask":
    frames = pool[0].chat("Say hi.", max_tokens=4)
    try:
        print("answering" if next(frames).type == "decision" else "unrouted", flush=True)
        print(*[frame.type for frame in frames][-1:], flush=True)
    except LocodError as exc:
        print("failed", exc.code, flush=True)
else:
    print("holding", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("flag", ["--json", "-v"])
def test_a_flag_without_a_value_before_an_unknown_command_names_the_command(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found: `locod --json frobnicate` said "--json goes after the command: `locod ask --json` or ..." (the
    check for a valued option given before its command took any flag): the user moved --json and was then
    told 'frobnicate' is no command. A flag without a value takes no word, so the unknown command is said."""
    assert cli.main([flag, "frobnicate"]) == 2
    out, err = capsys.readouterr()
    assert "invalid choice: 'frobnicate'" in err and "goes after" not in err, err
    if flag == "--json":  # a --json command line still gets its error object
        assert json.loads(out)["code"] == "usage"


def test_a_valued_option_before_its_action_is_told_where_it_goes(capsys: pytest.CaptureFixture[str]) -> None:
    """Found: `locod models --dir ~/m fetch` was "invalid choice: '~/m'" and the list of models' actions, as
    `locod --limit 5 decisions` was at locod's own level before 6edf628: the option is told where it goes at
    every level."""
    assert cli.main(["models", "--dir", "/tmp/m", "fetch"]) == 2
    err = capsys.readouterr().err
    assert "locod models: error: --dir goes after the command: `locod models fetch --dir`" in err, err


def test_a_typo_of_an_action_after_the_command_is_still_named(capsys: pytest.CaptureFixture[str]) -> None:
    """Held: an action with no near miss right after its command (`locod models xyz`) is argparse's invalid
    choice, not taken for an option's value; a near miss is named."""
    assert cli.main(["models", "xyz"]) == 2
    assert "invalid choice: 'xyz'" in capsys.readouterr().err
    assert cli.main(["models", "lst"]) == 2
    assert "did you mean `locod models list`?" in capsys.readouterr().err


def hold_pool(handle: DaemonHandle, size: int, ask: bool = False) -> subprocess.Popen[str]:
    """A process holding ``size`` clients at ``handle``'s ipc socket, once they have all asked; with ``ask``,
    its oldest one answering a turn."""
    words = [sys.executable, "-c", POOL, handle.endpoint, str(size), "ask" if ask else "hold"]
    pool = subprocess.Popen(words, env=handle.env, stdout=subprocess.PIPE, text=True)
    assert pool.stdout is not None and pool.stdout.readline().strip() in ("answering", "holding")
    return pool


def test_the_greediest_process_keeps_its_connection_with_a_turn_in_flight(
    daemon_factory: Any, proxy: FaultProxy
) -> None:
    """Found: past the ipc socket's whole bound, a newcomer from a process holding two fewer took the greediest
    process's oldest connection, whatever it was doing (29b55d6). The owner's `locod status` (or the liveness
    probe a client makes each second of silence) cut the turn a long-lived pool of the owner's was answering:
    the answer was lost, and its client said the daemon "may be stuck" after its whole turn timeout (since
    6bec3c7, that it was refused at its bound, which it was not). An eviction now takes the greediest process's
    oldest connection without a turn in flight."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    config = cloud_config(proxy.base_url, timeout_s=120.0)
    handle = daemon_factory(config, fd_limit=300, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})  # ipc bound: 37, 18
    held = Fault(kind="hold", times=1)  # the pool's turn stays in flight until the test lets it go
    proxy.set(held)
    pools = [hold_pool(handle, 18, ask=True), hold_pool(handle, 17), hold_pool(handle, 2)]
    try:
        wait_for(lambda: proxy.seen, 120, "the pool's turn at the cloud")
        status = handle.cli("status", "--json")
        assert status.returncode == 0, status.stderr
        seen = json.loads(status.stdout)
        assert seen["queue"]["in_flight"] == 1 and seen["ipc"]["evicted"] >= 1, seen["ipc"]  # during the turn
        assert "closed the oldest connection from pid" in handle.log()
        held.released.set()
        assert pools[0].stdout is not None and pools[0].stdout.readline().strip() == "done"
    finally:
        held.released.set()
        for pool in pools:
            pool.kill()
            pool.wait()
