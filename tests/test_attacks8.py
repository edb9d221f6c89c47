"""Round eight of attacks on a running daemon, on what comes back from outside: a hostile cloud endpoint's
replies, attachments, model and policy files. Each test is one way in that broke, and now holds."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from locod.errors import AttachmentError, ModelError
from locod.protocol import Attachment

from .conftest import REPO, cloud_config, start_daemon
from .faultproxy import Fault, FaultProxy

# Tight cloud bounds, so that a hostile reply is cut within seconds (the defaults allow minutes and 16 MB).
BOUNDS = {"timeout_s": 2.0, "deadline_s": 6.0, "max_answer_bytes": 1 << 20, "max_event_bytes": 64 << 10}


@pytest.fixture
def hostile_cloud() -> Iterator[FaultProxy]:
    """The fault proxy alone: every answer is made up by it, nothing is forwarded."""
    proxy = FaultProxy("http://127.0.0.1:9").start()
    yield proxy
    proxy.stop()


def _peak_rss(pid: int) -> int:
    """The process's resident high-water mark (VmHWM), in bytes: a peak that was freed again still shows."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def test_a_compressed_answer_is_bounded_by_what_it_inflates_to(daemon_factory: Any, hostile_cloud: FaultProxy) -> None:
    """The answer's byte bounds counted the bytes on the wire, and httpx inflated a gzip body above them: a
    256 kB gzip stream of one 256 MB event passed max_answer_bytes and max_event_bytes, and the daemon held
    over a gigabyte for it (a 2 MB one would take eight). Now the bounds count the inflated bytes; a well
    compressed answer is read as before."""
    handle = daemon_factory(cloud_config(hostile_cloud.base_url, max_retries=0, **BOUNDS))
    client = handle.client(turn_timeout_s=120)
    hostile_cloud.set(Fault("gzip"))
    assert client.ask("Say hi.", max_tokens=4).text == "Hello"
    assert client.ask("Say hi.", force="local", max_tokens=2).done is not None  # the fallback's model, loaded
    before = _peak_rss(handle.proc.pid)
    hostile_cloud.set(Fault("gzip_bomb", size=256 << 20))
    result = client.ask("Say something.", max_tokens=4)
    assert _peak_rss(handle.proc.pid) - before < 96 << 20
    assert result.fallback is not None and result.fallback.cause == "cloud_answer_too_large"
    assert result.done.outcome == "fallback"
    assert hostile_cloud.chat_requests()[-1].headers["accept-encoding"] == "gzip, deflate"


def test_a_compressed_answer_that_inflates_to_nothing_is_cut_at_the_deadline(
    daemon_factory: Any, hostile_cloud: FaultProxy
) -> None:
    """The deadline is checked as the answer's bytes come up, and gzip that inflates to nothing brings none:
    an endpoint sending an empty deflate block every 0.2 s (each in time for the read timeout) held the turn
    past its deadline, and past any cancel, for as long as it went on. Each chunk off the wire is checked
    now, whatever it inflates to."""
    handle = daemon_factory(cloud_config(hostile_cloud.base_url, max_retries=0, **BOUNDS))
    hostile_cloud.set(Fault("gzip_idle", delay_s=0.2))
    result = handle.client(turn_timeout_s=120).ask("Say something.", max_tokens=4)
    assert result.fallback is not None and result.fallback.cause == "cloud_deadline", result.fallback
    assert result.done.outcome == "fallback"


def test_a_cloud_answer_that_is_not_text_cannot_poison_its_session(
    daemon_factory: Any, hostile_cloud: FaultProxy
) -> None:
    """JSON's "\\ud800" is a lone UTF-16 surrogate: valid JSON, no text any encoder takes. The doors refuse it
    in a request, but a cloud answer holding one was streamed, kept in the session's history, and each later
    turn of that session, local or cloud, failed as `internal error: UnicodeEncodeError`. Now it is an
    invalid reply: the turn falls back, and the session goes on."""
    handle = daemon_factory(cloud_config(hostile_cloud.base_url, max_retries=0, breaker_failures=100, **BOUNDS))
    client = handle.client(turn_timeout_s=120)
    hostile_cloud.set(Fault("surrogate"))
    poisoned = client.ask("Say hi.", session="s1", max_tokens=4)
    assert poisoned.fallback is not None and poisoned.fallback.cause == "cloud_invalid_reply"
    assert "\ud800" not in poisoned.text
    assert client.ask("Say hello.", session="s1", force="local", max_tokens=2).done.outcome == "ok"
    hostile_cloud.set(Fault("gzip"))  # a valid answer
    assert client.ask("Say yes.", session="s1", max_tokens=4).text == "Hello"
    assert "Traceback" not in handle.log()


@pytest.mark.parametrize("kind", ["bad_shape", "not_utf8"])
def test_a_reply_that_is_not_a_chat_completion_is_named_so(
    daemon_factory: Any, hostile_cloud: FaultProxy, kind: str
) -> None:
    """A chunk whose ``choices`` is a string, or an event that is not UTF-8, was reported as a stream that
    "broke after 0 characters: AttributeError" (or UnicodeDecodeError), `cloud_stream_cut`: a network fault,
    by its words. It is the endpoint's reply that is wrong: `cloud_invalid_reply`, as the protocol documents."""
    handle = daemon_factory(cloud_config(hostile_cloud.base_url, max_retries=0, breaker_failures=100, **BOUNDS))
    hostile_cloud.set(Fault(kind))
    result = handle.client(turn_timeout_s=120).ask("Say hi.", max_tokens=4)
    assert result.fallback is not None and result.fallback.cause == "cloud_invalid_reply"
    assert "not a chat completion chunk" in result.fallback.message
    assert result.done.outcome == "fallback"


def test_a_document_in_a_dense_script_is_cut_to_fit_the_local_model(daemon_factory: Any) -> None:
    """A local model sees a third of its context of its documents' excerpts, measured at four characters
    a token. Chinese text (here a 40 kB document), digits or code take several times that: every local turn
    with such a document, however short its question, was refused as prompt_too_long, by an excerpt the
    daemon chose. Now the excerpts are halved until the question fits with them, and it is answered."""
    model = {"name": "smollm2-135m-instruct", "path": "SmolLM2-135M-Instruct.Q4_1.gguf", "n_ctx": 512}
    config = {"routing": {"mode": "local"}, "local": {"models": [model]}, "attachments": {"doc_chunk_chars": 200}}
    handle = daemon_factory(config)
    document = Attachment("document", "notes.txt", data=("这是一个关于机器学习的文档。" * 1000).encode())
    result = handle.client().ask("What is this document about?", attachments=[document], max_tokens=4)
    assert result.done.outcome == "ok"
    assert 100 < result.done.tokens_in <= 512  # the question (about 20 tokens) with what fits of the document
    (row,) = handle.rows()
    assert row["outcome"] == "ok"


def _scan_bomb(side: int, extra_scans: int) -> bytes:
    """A flat progressive JPEG of ``side`` x ``side`` pixels with its smallest scan repeated ``extra_scans``
    times: libjpeg only warns ("inconsistent progression sequence") and goes over the image for each."""
    ok, encoded = cv2.imencode(
        ".jpg", np.full((side, side, 3), 120, np.uint8), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_QUALITY, 50]
    )
    assert ok
    data = encoded.tobytes()
    starts = [i for i in range(len(data) - 1) if data[i : i + 2] == b"\xff\xda"]
    scans = [data[a:b] for a, b in zip(starts, [*starts[1:], len(data) - 2])]
    return data[:-2] + min(scans, key=len) * extra_scans + b"\xff\xd9"


def test_a_jpeg_of_many_scans_is_refused_before_it_is_decoded(daemon_factory: Any) -> None:
    """The decode budget bounds an image's memory, not its time: libjpeg goes over the whole image once per
    scan, and a progressive JPEG's smallest scan repeated thousands of times (30 bytes each) made a 250 kB
    file that held a turn's thread for minutes of CPU, past any cancel. Now a JPEG of more than 100 scans
    (a progressive one has about 10) is refused from its header."""
    handle = daemon_factory({"routing": {"mode": "local"}})
    client = handle.client()
    bomb = Attachment("image", "scans.jpg", data=_scan_bomb(2000, 400))
    with pytest.raises(AttachmentError) as refused:
        client.ask("What is in this picture?", attachments=[bomb], max_tokens=2)
    assert refused.value.code == "bad_image" and "scans, more than 100" in refused.value.message
    fine = Attachment("image", "fine.jpg", data=_scan_bomb(2000, 0))  # the progressive JPEG itself
    assert client.ask("What is in this picture?", attachments=[fine], max_tokens=2).done.outcome == "ok"


def _with_template(source: Path, target: Path, template: str) -> Path:
    """A copy of the GGUF ``source`` whose chat template is ``template``, padded with a Jinja comment to the
    length of the one it replaces, or longer by a multiple of the file's 32-byte alignment (so that the
    tensor data moves by whole alignment steps, and the offsets into it still hold)."""
    data = bytearray(source.read_bytes())
    key = b"tokenizer.chat_template"
    at = data.index(key) + len(key) + 4  # past the key and its value type: the string's length, then bytes
    length = int.from_bytes(data[at : at + 8], "little")
    text = template.encode()
    size = max(length, len(text) + 4)
    size += -(size - length) % 32
    padded = text + b"{#" + b" " * (size - len(text) - 4) + b"#}"
    data[at : at + 8 + length] = size.to_bytes(8, "little") + padded
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(bytes(data))
    return target


# Jinja's sandbox bounds one range() to 100,000 items: two nested ones render for hours.
LOOPS = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"


@pytest.mark.parametrize(
    ("template", "code", "said"),
    [
        ("{{ raise_exception('Conversation roles must alternate') }}", "model_template", "roles must alternate"),
        ("{{ messages[7]['content'] }}", "model_template", "has no element 7"),
        ("{% for m in messages %}{{ m.content }", "model_corrupt", "is not valid Jinja: unexpected '}'"),
        ("{%if 1%}" * 99 + "{%endif%}" * 99, "model_corrupt", "is not valid Jinja: too many levels of indentation"),
        ("{{" + "(" * 300 + "1" + ")" * 300 + "}}", "model_corrupt", "is not valid Jinja: maximum recursion depth"),
        (LOOPS, "model_template", "still rendering after 2 s and was stopped"),
        ("{{ range(200000)|length }}", "model_template", "Range too big"),
        ("{{ messages|length // 0 }}", "model_template", "by zero"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "model_template", "recursion"),
    ],
)
def test_a_chat_template_that_fails_is_named_and_the_other_models_answer(
    daemon_factory: Any, model_path: Path, tmp_path: Path, template: str, code: str, said: str
) -> None:
    """A GGUF's chat template is Jinja, run by llama-cpp-python: one that raised (as Mistral's and Gemma's
    do for roles that do not alternate, or a system message) failed the turn as `internal error:
    ValueError`, and one that did not parse raised out of the model's load the same way (and as the default
    model, the daemon died at start with a traceback); one that looped held the local model's worker, and
    every local turn behind it, for hours. Now all are model errors that quote the template's message (a
    render is stopped after 2 s), and the other models answer on. Python's own errors from the sandbox's
    objects (a range() it refuses as too big, // 0, a macro that calls itself) were still `internal
    error: OverflowError` and so on: they are the template's failure too; and so are Python's limits on the
    code Jinja compiles it to (nesting 99 blocks deep, 300 parentheses), which escaped the load."""
    broken = _with_template(model_path, tmp_path / "models" / "broken.gguf", template)
    models = [
        {"name": "smollm2-135m-instruct", "path": str(model_path)},
        {"name": "broken", "path": str(broken)},
    ]
    handle = daemon_factory({"routing": {"mode": "local"}, "local": {"models": models}})
    client = handle.client(turn_timeout_s=120)
    with pytest.raises(ModelError) as failed:
        client.ask("Say hi.", model="broken", max_tokens=2)
    assert failed.value.code == code and said in failed.value.message, failed.value.message
    assert client.ask("Say hi.", max_tokens=2).done.outcome == "ok"
    assert "Traceback" not in handle.log()


def test_a_template_that_does_not_parse_is_not_said_to_be_mended_by_chat_format(
    daemon_factory: Any, model_path: Path, tmp_path: Path
) -> None:
    """llama-cpp-python compiles every chat template a GGUF holds as it loads the model, whatever
    chat_format says: the error for one that does not parse told the user to set chat_format, and a model
    that has it set failed the same way. It now says that only another file (or a rewritten template)
    loads."""
    broken = _with_template(model_path, tmp_path / "models" / "broken.gguf", "{% if %}")
    models = [
        {"name": "smollm2-135m-instruct", "path": str(model_path)},
        {"name": "broken", "path": str(broken), "chat_format": "chatml"},
    ]
    handle = daemon_factory({"routing": {"mode": "local"}, "local": {"models": models}})
    with pytest.raises(ModelError) as failed:
        handle.client(turn_timeout_s=120).ask("Say hi.", model="broken", max_tokens=2)
    assert failed.value.code == "model_corrupt" and "is not valid Jinja" in failed.value.message
    assert "set chat_format" not in failed.value.message, failed.value.message
    assert "whatever chat_format says" in failed.value.message


def test_a_default_model_whose_template_does_not_parse_stops_the_start_by_name(
    tmp_path: Path, model_path: Path
) -> None:
    """The default model is loaded before the daemon serves: a template that does not parse ended the start
    with exit 1 and llama-cpp-python's traceback. Now it is exit 3 and one line that names the file."""
    broken = _with_template(model_path, tmp_path / "models" / "broken.gguf", "{% if %}")
    config = {"local": {"models": [{"name": "smollm2-135m-instruct", "path": str(broken)}]}}
    handle = start_daemon(tmp_path / "d", tmp_path / "models", config, wait=False)
    try:
        assert handle.proc.wait(120) == 3  # a model error (EXIT_CODES), not a crash
    finally:
        handle.stop()
    assert "is not valid Jinja" in handle.log() and "Traceback" not in handle.log()


def _looping_policy(target: Path, trips: int) -> Path:
    """The shipped policy with a Loop of ``trips`` empty steps added to its graph, whose result it adds
    (times zero) to its log-probabilities: the same answers, after as long as the loop takes."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    model = onnx.load(REPO / "policy" / "default" / "policy.onnx")
    graph = model.graph
    for node in graph.node:
        node.output[:] = ["raw_log_probs" if name == "log_probs" else name for name in node.output]
    body = helper.make_graph(
        [helper.make_node("Identity", ["go_in"], ["go_out"]), helper.make_node("Add", ["v_in", "one"], ["v_out"])],
        "step",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("go_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("go_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])],
    )
    graph.initializer.extend(
        [
            helper.make_tensor("trips", TensorProto.INT64, [], [trips]),
            helper.make_tensor("go", TensorProto.BOOL, [], [True]),
            helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Loop", ["trips", "go", "zero"], ["looped"], body=body),
            helper.make_node("Mul", ["looped", "zero"], ["nothing"]),
            helper.make_node("Add", ["raw_log_probs", "nothing"], ["log_probs"]),
        ]
    )
    onnx.save(model, target)
    return target


@pytest.mark.parametrize(
    ("trips", "said"),
    [(10**12, "was still deciding after 1 s and was stopped"), (50_000, "ms to decide, over 5 ms")],
)
def test_a_policy_that_takes_long_to_decide_is_refused_at_reload(
    daemon_factory: Any, tmp_path: Path, trips: int, said: str
) -> None:
    """The policy file was checked for its shapes and finite answers, never for its time: one with a Loop
    node was taken, and each turn's decision (under the router's lock, so every turn's) took as long as the
    loop, for ever with 10^12 steps; a reload to it held the serving loop, ping and status included, for
    good. Now a probe run is stopped after a second, a policy slower than 5 ms is refused by name, and the
    router keeps the policy it had."""
    policy = tmp_path / "d" / "state" / "policy.onnx"
    policy.parent.mkdir(parents=True)
    shutil.copyfile(REPO / "policy" / "default" / "policy.onnx", policy)
    handle = daemon_factory()
    client = handle.client(timeout_s=60)
    before = client.status()["routing"]["policy"]
    os.replace(_looping_policy(tmp_path / "slow.onnx", trips), policy)
    reloaded = client.reload()
    assert reloaded["reloaded"] and said in reloaded["policy_error"], reloaded
    assert client.status()["routing"]["policy"] == before
    assert client.ask("Say hi.", max_tokens=2).done.outcome == "ok"
