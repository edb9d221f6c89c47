"""Round eight of attacks on a running daemon, on what comes back from outside: a hostile cloud endpoint's
replies, attachments, model and policy files. Each test is one way in that broke, and now holds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from locod.protocol import Attachment

from .conftest import cloud_config
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
