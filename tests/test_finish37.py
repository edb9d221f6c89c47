"""How a turn ended, told to the client: why an answer ended is the answering backend's own word, at both
doors, and an accepted turn that failed names its record to the Python client and to `locod ask`.

The HTTP door inferred ``finish_reason`` from the token counts alone, so a cloud endpoint's
``content_filter`` (an answer its provider cut off) reached an OpenAI client as ``stop``: a complete answer.
The done frame now carries the backend's reason (llama.cpp's ``stop``/``length``, the endpoint's as it said
it) and the HTTP door passes it on. Real parts: the embedded model, the loopback llama_cpp.server as the
cloud behind the fault proxy, the openai SDK.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from typing import Any

from locod.errors import StorageError

from .conftest import cloud_config, locod_command, wait_for
from .faultproxy import Fault, FaultProxy
from .test_http import LOCAL, http_daemon, sdk

CLOUD = "cloud-small"
HI = [{"role": "user", "content": "Say hi."}]


def test_a_cloud_endpoints_content_filter_reaches_both_doors_as_it_said_it(
    daemon_factory: Any, proxy: FaultProxy
) -> None:
    handle, base = http_daemon(daemon_factory, cloud_config(proxy.base_url, timeout_s=120.0))
    proxy.set(Fault(kind="finish", finish="content_filter"))

    whole = sdk(base).chat.completions.create(model=CLOUD, messages=HI, max_tokens=8, temperature=0)
    assert whole.choices[0].finish_reason == "content_filter"
    chunks = list(sdk(base).chat.completions.create(model=CLOUD, messages=HI, max_tokens=8, temperature=0, stream=True))
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == ["content_filter"]
    turn = handle.client().ask("Say hi.", model=CLOUD, max_tokens=8)
    assert turn.done.finish_reason == "content_filter" and turn.done.location == "cloud"


def test_the_reason_is_the_backends_stop_or_length(daemon_factory: Any, proxy: FaultProxy) -> None:
    """A local answer ended at a stop string says ``stop``, one at its ``max_tokens`` ``length``; a cloud
    answer at its ``max_tokens`` says the endpoint's ``length``."""
    handle, base = http_daemon(daemon_factory, cloud_config(proxy.base_url, timeout_s=120.0))
    client = handle.client()
    stopped = client.ask("Say hello to my friend Anna.", model=LOCAL, max_tokens=48, stop=" ", temperature=0)
    assert stopped.done.finish_reason == "stop" and " " not in stopped.text
    assert client.ask("Count to twenty.", model=LOCAL, max_tokens=2).done.finish_reason == "length"
    assert client.ask("Count to twenty.", model=CLOUD, max_tokens=2).done.finish_reason == "length"
    cut = sdk(base).chat.completions.create(model=CLOUD, messages=HI, max_tokens=2, temperature=0)
    assert cut.choices[0].finish_reason == "length"


def test_an_accepted_turn_that_failed_names_its_record_to_the_client_and_to_locod_ask(
    daemon_factory: Any, proxy: FaultProxy
) -> None:
    """The error frame of an accepted turn carries its ``decision``; the Python client dropped it, so
    `locod ask` said what failed and not which record to look at. A completion held back by another
    process's lock on the decision log (``record_not_committed``) is such a failure."""
    held = Fault("hold")
    proxy.set(held)
    handle, _ = http_daemon(daemon_factory, cloud_config(proxy.base_url, timeout_s=60.0))
    asked = subprocess.Popen(
        locod_command("--config", str(handle.config_path), "ask", "--json", "--model", CLOUD, "Say hi."),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=handle.env,
    )
    decision = wait_for(lambda: handle.rows() and handle.rows()[-1]["id"], what="the turn's record begun")
    holder = sqlite3.connect(handle.db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # as `sqlite3 locod.db` with `BEGIN IMMEDIATE;` would
    try:
        held.released.set()  # the cloud answers; the completion waits out the lock and is held back
        out, err = asked.communicate(timeout=120)
    finally:
        holder.rollback()
        holder.close()
    assert asked.returncode != 0
    error = json.loads(out.splitlines()[-1])
    assert (error["type"], error["code"], error["decision"]) == ("error", "record_not_committed", decision)
    assert f"`locod decisions {decision}`" in err, err

    proxy.set(Fault("hold"))
    client = handle.client()
    frames = client.chat("Say hi again.", model=CLOUD)
    accepted = next(frames)
    holder = sqlite3.connect(handle.db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        proxy.faults[0].released.set()
        try:
            list(frames)
        except StorageError as exc:
            failed: StorageError | None = exc
        else:
            failed = None
    finally:
        holder.rollback()
        holder.close()
    assert failed is not None and failed.decision == accepted.decision, failed
