"""Mend 29: four things a new user's walk and a review found at the doors, each mended and held here on real
parts (a daemon with the embedded model, the real openai SDK, the loopback llama_cpp.server as the cloud).

Token counts locod estimated from characters are marked so over HTTP, as the socket's ``done`` frame marks
their price; ``GET /v1/models`` gives each model a ``created`` time; a refusal of an unknown model name lists
the models it may send apart from those left out for their file, with why, at both doors; and a turn whose
local model a reload removed while it waited is refused as retryable (503, exit 6), not as a fault (500, 3).
"""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from locod.errors import Busy, UnknownModel
from locod.protocol import DeltaFrame

from .conftest import DaemonHandle, cloud_config, locod_command, wait_for, write_config
from .faultproxy import Fault, FaultProxy
from .test_http import LOCAL, get, http_daemon, sdk

CLOUD = "cloud-small"
HI = [{"role": "user", "content": "Say hi."}]


def test_token_counts_estimated_from_characters_are_marked_over_http_as_the_done_frame_marks_their_price(
    daemon_factory: Any, proxy: FaultProxy
) -> None:
    """The loopback server sends no ``usage`` in a stream, so locod counts the cloud answer's tokens from its
    characters (the record's ``cost_estimated``, the done frame's); the HTTP ``usage`` looked exact all the
    same. It now carries ``estimated: true`` and the ``locod`` object ``cost_estimated: true``, as the socket's
    done frame does; counts the endpoint reported, and a local answer's, carry neither."""
    handle, base = http_daemon(daemon_factory, cloud_config(proxy.base_url, timeout_s=120.0))
    stream = sdk(base).chat.completions.create(
        model=CLOUD, messages=HI, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    usage = chunks[-1].usage
    assert usage is not None and usage.model_extra == {"estimated": True}, usage
    ending = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert ending.model_extra is not None and ending.model_extra["locod"]["cost_estimated"] is True
    assert handle.rows()[-1]["cost_estimated"] == 1
    assert handle.client().ask("Say hi.", model=CLOUD, max_tokens=8).done.cost_estimated is True  # the socket's

    proxy.set(Fault(kind="usage", usage={"prompt_tokens": 21, "completion_tokens": 5, "total_tokens": 26}, times=1))
    reported = sdk(base).chat.completions.create(model=CLOUD, messages=HI, max_tokens=8, temperature=0)
    assert reported.usage is not None and (reported.usage.prompt_tokens, reported.usage.completion_tokens) == (21, 5)
    assert reported.usage.model_extra == {}
    assert reported.model_extra is not None and "cost_estimated" not in reported.model_extra["locod"]
    local = sdk(base).chat.completions.create(model=LOCAL, messages=HI, max_tokens=2)
    assert local.usage is not None and local.usage.model_extra == {}


def test_the_model_list_gives_a_local_model_its_file_s_time_and_a_cloud_model_when_it_was_first_offered(
    daemon_factory: Any, proxy: FaultProxy, model_path: Path
) -> None:
    """``GET /v1/models`` said ``created: 0`` (1970) of every model. A local model's is now its GGUF's
    modification time; ``auto``'s and a cloud model's, when the daemon began offering it: its start, or the
    reload that added it, which a later reload that keeps it does not move."""
    started = int(time.time())
    config = cloud_config(proxy.base_url)
    handle, base = http_daemon(daemon_factory, config)
    listed = models_by_id(base)
    assert listed[LOCAL] == int(model_path.stat().st_mtime)
    assert started <= listed["auto"] == listed[CLOUD] <= int(time.time())

    reloaded = int(time.time())
    second = {**config["cloud"]["models"][0], "name": "cloud-second"}
    config["cloud"] = {**config["cloud"], "models": [*config["cloud"]["models"], second]}
    write_config(handle.config_path, config)
    assert handle.client().reload()["reloaded"] is True
    after = models_by_id(base)
    assert after[CLOUD] == listed[CLOUD] and after[LOCAL] == listed[LOCAL]
    assert reloaded <= after["cloud-second"] <= int(time.time())
    status, one = get(f"{base}/v1/models/cloud-second")
    assert status == 200 and '"created":' + str(after["cloud-second"]) in one.replace(" ", "")


def models_by_id(base: str) -> dict[str, int]:
    return {m.id: m.created for m in sdk(base).models.list()}


def test_an_unknown_model_s_refusal_names_the_models_to_send_apart_from_those_left_out_for_their_file(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """The HTTP 404 for an unknown model listed local models whose file is missing or broken among the names
    to send, which ``/v1/models`` does not list (and the socket's refusal did the same). Both doors now list
    the usable ones, then those left out, each with why in a few words; naming one still gives its file's
    story."""
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a model at all")
    local = {
        "models": [{"name": "gone", "path": str(tmp_path / "nowhere.gguf")}, {"name": "broken", "path": str(broken)}]
    }
    handle, base = http_daemon(daemon_factory, {"local": local})
    left_out = (
        "left out until their file can be loaded: 'broken' (its file is no loadable GGUF), "
        "'gone' (its file is missing or unreadable)"
    )

    with pytest.raises(openai.NotFoundError) as over_http:
        sdk(base).chat.completions.create(model="nope", messages=HI, max_tokens=2)
    message = over_http.value.body["message"]  # type: ignore[index]
    assert over_http.value.body["code"] == "model_not_found"  # type: ignore[index]
    assert f"send 'auto' or one of '{LOCAL}'; {left_out}; see GET /v1/models" in message, message
    status, one = get(f"{base}/v1/models/nope")
    assert status == 404 and left_out in one, one

    with pytest.raises(UnknownModel) as over_socket:
        handle.client().ask("Say hi.", model="nope", max_tokens=2)
    assert f"local models: ['{LOCAL}'], cloud models: []; {left_out}" in over_socket.value.message

    with pytest.raises(openai.NotFoundError) as named:  # a left-out model named: its file's own refusal
        sdk(base).chat.completions.create(model="gone", messages=HI, max_tokens=2)
    assert named.value.body["code"] == "model_missing"  # type: ignore[index]


def test_a_turn_whose_local_model_a_reload_removed_while_it_waited_is_refused_as_retryable_at_every_door(
    daemon_factory: Any,
) -> None:
    """Three turns naming a second local model wait for the local model behind a long answer; a reload drops
    that model. Each then asked ``ModelZoo.get`` for a model it no longer had: ``model`` / ``unknown_model``,
    a 500 over HTTP and exit 3 from the CLI, where the request named a model that existed when it was sent.
    Now each is ``busy`` / ``model_reloaded``, naming the reload: 503 with ``Retry-After`` over HTTP (the SDKs
    send it again, and the configuration now running decides it), exit 6 (try again) from the CLI; nothing
    is recorded, as for any turn refused before its decision."""
    config: dict[str, Any] = {"local": {"models": [{"name": "spare", "path": "SmolLM2-135M-Instruct.Q4_1.gguf"}]}}
    handle, base = http_daemon(daemon_factory, config)
    holder = handle.client()
    long_answer = holder.chat("Count from 1 to 5000, one number per line.", model=LOCAL, max_tokens=1500, temperature=0)
    assert isinstance(next(f for f in long_answer if isinstance(f, DeltaFrame)), DeltaFrame)  # it holds the model

    def socket_turn() -> BaseException | None:
        try:
            handle.client().ask("Say hi.", model="spare", max_tokens=2)
        except Busy as exc:
            return exc
        return None

    def http_turn() -> BaseException | None:
        try:
            sdk(base).chat.completions.create(model="spare", messages=HI, max_tokens=2)
        except openai.APIStatusError as exc:
            return exc
        return None

    cli = subprocess.Popen(
        locod_command("--config", str(handle.config_path), "ask", "--model", "spare", "--max-tokens", "2", "Say hi."),
        env=handle.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with ThreadPoolExecutor(2) as pool:
        over_socket, over_http = pool.submit(socket_turn), pool.submit(http_turn)
        wait_for(lambda: waiting_for_local(handle) == 3, 120, "three turns to wait for the local model")
        write_config(handle.config_path, {"http": {"listen": base.removeprefix("http://")}})  # no spare model
        assert handle.client().reload()["models_changed"] == ["removed spare"]
        assert waiting_for_local(handle) == 3, "the long answer ended before the reload: the race was not made"
        long_answer.close()  # cancels it: the waiting turns get the local model
        socket_error, http_error = over_socket.result(300), over_http.result(300)
    _, stderr = cli.communicate(timeout=300)

    assert isinstance(socket_error, Busy) and socket_error.code == "model_reloaded", socket_error
    assert "'spare' was removed by a reload of the configuration" in socket_error.message
    assert isinstance(http_error, openai.APIStatusError) and http_error.status_code == 503, http_error
    assert http_error.body["code"] == "model_reloaded"  # type: ignore[index]
    assert http_error.response.headers["retry-after"] == "1"
    assert cli.returncode == 6 and "'spare' was removed by a reload" in stderr, (cli.returncode, stderr)
    assert [row["model"] for row in handle.rows()] == [LOCAL]  # the long answer's alone


def waiting_for_local(handle: DaemonHandle) -> int:
    return int(handle.client().status()["queue"]["waiting_for_local"])
