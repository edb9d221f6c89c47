"""Small things earlier sessions noticed and left: `locod stop MODEL`, a document's stray byte, config values
the validator took (an empty cloud model id, empty telemetry roots, a cache over the memory budget), a JSON
schema without its name, a cloud stream dropped after its finish chunk, empty stop sequences, and two turns
of one id on one connection. Each against the real daemon, model, cloud server and fault proxy."""

from __future__ import annotations

import json
import os
import resource
import subprocess
from pathlib import Path
from typing import Any

import pytest
import zmq

from locod.client import Attachment, Client
from locod.daemon.config import load_config
from locod.daemon.openai_wire import HttpError, parse_completion
from locod.errors import AttachmentError, ConfigError, DaemonNotRunning

from .conftest import SECRET, DaemonHandle, cloud_config, locod_command, write_config
from .faultproxy import Fault, FaultProxy
from .test_http import LOCAL

ASK = [{"role": "user", "content": "Say hello."}]


def test_stop_with_a_model_name_says_what_locod_stop_does_and_how_models_are_unloaded(tmp_path: Path) -> None:
    """`ollama stop MODEL` unloads a model; `locod stop tiny` was refused as "unrecognized arguments: tiny",
    leaving a user unsure whether the daemon, the model or nothing would stop."""
    env = {**os.environ, "HOME": str(tmp_path), "LOCOD_RUNTIME_DIR": str(tmp_path / "run")}
    said = subprocess.run(locod_command("stop", "tiny"), capture_output=True, text=True, env=env, timeout=60)
    assert said.returncode == 2, said
    assert "unrecognized arguments: tiny; `locod stop` stops the daemon and takes no model" in said.stderr
    assert "local.memory_budget_mb" in said.stderr and "`locod reload`" in said.stderr, said.stderr


def test_a_document_with_one_stray_byte_is_refused_with_its_offset_and_line(daemon: DaemonHandle) -> None:
    """A UTF-8 file with one Latin-1 byte pasted in was refused as "not UTF-8 text": its user could not find
    the byte in a long file."""
    text = "first line\nsecond line\nthe caf\xe9 on the third\n".encode("latin-1")
    with Client(daemon.endpoint) as client, pytest.raises(AttachmentError) as refused:
        client.ask("Summarise", attachments=[Attachment("document", "notes.md", data=text)], max_tokens=2)
    said = refused.value.message
    assert "document 'notes.md' is not UTF-8 text (byte 0xe9 at offset 30, line 3)" in said, said
    assert text[30] == 0xE9


@pytest.mark.parametrize(
    ("config", "said"),
    [
        (
            {"cloud": {"models": [{"name": "c", "base_url": "http://127.0.0.1:9/v1", "model": ""}]}},
            "cloud.models[0].model must not be empty",
        ),
        ({"telemetry": {"sysfs_root": ""}}, 'telemetry.sysfs_root must be an absolute path or begin with ~/, got ""'),
        ({"telemetry": {"procfs_root": ""}}, 'telemetry.procfs_root must be an absolute path or begin with ~/, got ""'),
        ({"local": {"cache_mb": 1 << 20}}, "local.cache_mb must be -1, 0 or at most local.memory_budget_mb (4096)"),
        (
            {"local": {"cache_mb": 600, "memory_budget_mb": 512}},
            "local.cache_mb must be -1, 0 or at most local.memory_budget_mb (512), got 600",
        ),
    ],
)
def test_config_values_that_cannot_work_are_refused_naming_the_file_and_key(
    tmp_path: Path, config: dict[str, Any], said: str
) -> None:
    """Each was taken: an empty model id sent every cloud turn to be refused by its endpoint, an empty root
    read the daemon's working directory for the battery, and a 1 TiB cache was the budget's room at most."""
    path = write_config(tmp_path / "config.toml", config)
    with pytest.raises(ConfigError) as refused:
        load_config(path, env={"HOME": str(tmp_path)})
    assert refused.value.message.startswith(f"{path}: ") and said in refused.value.message, refused.value.message


def test_a_cache_within_the_budget_and_real_roots_are_taken(tmp_path: Path) -> None:
    config = {"local": {"cache_mb": 512, "memory_budget_mb": 512}, "telemetry": {"sysfs_root": "~/sys"}}
    loaded = load_config(write_config(tmp_path / "config.toml", config), env={"HOME": str(tmp_path)})
    assert loaded.local.cache_mb == 512 and loaded.telemetry.sysfs_root == f"{Path.home()}/sys"


def raw_socket(handle: DaemonHandle) -> zmq.Socket[bytes]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(handle.endpoint)
    return sock


def chat(request_id: str, **fields: Any) -> bytes:
    return json.dumps({"v": 1, "id": request_id, "op": "chat", "messages": ASK, **fields}).encode()


def frames_of(sock: zmq.Socket[bytes], count_done: int) -> list[dict[str, Any]]:
    """Every frame read until ``count_done`` last frames (done or error) have come."""
    frames: list[dict[str, Any]] = []
    while sum(f["type"] in ("done", "error") for f in frames) < count_done:
        assert sock.poll(120_000), f"no reply after {frames}"
        frames.append(json.loads(sock.recv()))
    return frames


@pytest.mark.parametrize(
    "spec", [{"schema": {"type": "object"}}, {"name": "my schema", "schema": {}}, {"name": "", "schema": {}}]
)
def test_a_json_schema_without_a_valid_name_is_refused_by_both_doors(daemon: DaemonHandle, spec: Any) -> None:
    """OpenAI's API requires `json_schema.name` (letters, digits, _ and -, 64 at most): the socket answered
    without one, and a cloud model was sent a request its endpoint would refuse."""
    form = {"type": "json_schema", "json_schema": spec}
    sock = raw_socket(daemon)
    try:
        sock.send(chat("s1", options={"response_format": form, "max_tokens": 2}))
        (refused,) = frames_of(sock, 1)
    finally:
        sock.close()
    assert refused["type"] == "error" and refused["code"] == "bad_field", refused
    assert "options.response_format" in refused["message"] and "needs json_schema.name" in refused["message"]
    with pytest.raises(HttpError) as http:
        parse_completion({"model": "auto", "messages": ASK, "response_format": form}, [LOCAL])
    assert (http.value.status, http.value.param) == (400, "response_format")
    assert "needs json_schema.name" in http.value.message
    assert not daemon.rows(), "refused before a turn was accepted"


@pytest.mark.parametrize("finish", ["stop", 42])  # 42: a reason not passed on (attack41), a finish all the same
def test_a_cloud_stream_dropped_after_its_finish_chunk_is_a_whole_answer(
    daemon_factory: Any, proxy: FaultProxy, finish: Any
) -> None:
    """The connection dropped before `[DONE]` (a proxy, a NAT timeout) after the answer's finish chunk: the
    answer had come whole, yet it counted as cut, was thrown away for a local one and counted against the
    endpoint's breaker."""
    handle = daemon_factory(cloud_config(proxy.base_url, timeout_s=30.0), extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    proxy.set(Fault("finished_then_dropped", finish=finish, times=1))
    with handle.client() as client:
        result = client.ask("Say hello.", max_tokens=16)
        assert result.text == "The whole answer." and result.fallback is None, result.frames
        assert (result.done.location, result.done.outcome) == ("cloud", "ok"), result.done
    assert handle.rows()[-1]["outcome"] == "ok", handle.rows()[-1]


def test_an_empty_stop_sequence_is_refused_at_every_door(daemon: DaemonHandle) -> None:
    """An empty stop string would end every answer before its first character; OpenAI's API takes `stop`
    as a string or a list of strings, and an empty one matches nowhere useful: locod refuses it by name
    (`stop: ""` over HTTP is no stop at all, as OpenAI reads it)."""
    sock = raw_socket(daemon)
    try:
        sock.send(chat("e1", options={"stop": [""]}))
        (refused,) = frames_of(sock, 1)
    finally:
        sock.close()
    assert refused["code"] == "bad_field" and "non-empty strings" in refused["message"], refused
    with pytest.raises(HttpError) as http:
        parse_completion({"model": "auto", "messages": ASK, "stop": [""]}, [LOCAL])
    assert (http.value.status, http.value.param) == (400, "stop")
    assert parse_completion({"model": "auto", "messages": ASK, "stop": ""}, [LOCAL]).options.stop == ()
    given = daemon.cli("ask", "--stop", "", "hi")
    assert given.returncode == 2 and "--stop: must be 1 to 200 characters, got 0" in given.stderr, given.stderr


def test_a_second_turn_of_an_id_in_flight_on_the_connection_is_refused_and_the_first_goes_on(
    daemon: DaemonHandle,
) -> None:
    """Both turns ran, their frames under one id: a client read the two answers' words mixed, or took the
    first `done` for both. The second is refused on that id; the first answers whole."""
    sock = raw_socket(daemon)
    try:
        sock.send(chat("same", options={"max_tokens": 24, "temperature": 0}))
        sock.send(chat("same", options={"max_tokens": 24, "temperature": 0}))
        frames = frames_of(sock, 2)
        sock.send(chat("same", options={"max_tokens": 2}))  # once the first has answered, the id is free again
        again = frames_of(sock, 1)
    finally:
        sock.close()
    errors = [f for f in frames if f["type"] == "error"]
    assert len(errors) == 1 and errors[0]["code"] == "duplicate_id", frames
    assert 'a turn with id "same" is still in flight on this connection' in errors[0]["message"]
    assert [f["type"] for f in frames].count("decision") == 1 and frames[-1]["type"] == "done", frames
    assert again[-1]["type"] == "done", again
    assert len(daemon.rows()) == 2


def test_a_client_refused_at_the_ipc_sockets_bound_is_told_so_not_that_the_daemon_may_be_stuck(
    daemon_factory: Any,
) -> None:
    """The daemon's guard closes each connection over the ipc socket's bound (here half of it, from this
    process): the client, which reconnects by itself, waited out its whole timeout and was told "nothing
    from locod ... the daemon may be stuck or stopped", though it answered everyone else."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    handle = daemon_factory({}, fd_limit=160)  # the ipc bound: 20 in all, 10 from one process
    kept = []
    try:
        with pytest.raises(DaemonNotRunning) as refused:
            for _ in range(40):
                kept.append(handle.client(timeout_s=60))
                kept[-1].ping()  # vouched for: never evicted
        assert refused.value.code == "connection_refused" and len(kept) == 11, refused.value.message
        assert "closed this client's connection" in refused.value.message
        assert "at its bound on connections" in refused.value.message, refused.value.message
    finally:
        for client in kept:
            client.close()
