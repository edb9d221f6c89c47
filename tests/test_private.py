"""What stays on the device, with the real daemon, the real model and a real loopback cloud behind the
recording proxy: answers made from private attachments never reach a cloud model through the session's
history nor through the judge; a session's history is bounded in what a cloud turn uploads; a request
that no model could hold is refused before its documents are ranked; `locod ask --attach` refuses files
it should not read."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from locod.daemon.sessions import WITHHELD
from locod.errors import PromptTooLong
from locod.protocol import Attachment

from .conftest import SECRET, DaemonHandle, cloud_config, wait_for
from .faultproxy import FaultProxy
from .test_routing import auto_config

KEY = {"LOCOD_CLOUD_API_KEY": SECRET}
MEMO = Attachment("document", "memo.md", data=b"The vault code is ZX-4471-QQ.", private=True)


def test_answers_made_from_private_attachments_never_reach_the_cloud_through_history(
    daemon_factory: Any, proxy: FaultProxy
) -> None:
    handle = daemon_factory(cloud_config(proxy.base_url, timeout_s=60.0), extra_env=KEY)
    client = handle.client()
    options: dict[str, Any] = {"session": "vault", "max_tokens": 16, "temperature": 0.0, "seed": 1}
    first = client.ask("What is the vault code? Quote the memo.", attachments=[MEMO], force="local", **options)
    again = client.ask("Say the code once more.", force="local", **options)  # made from the first answer
    assert (first.decision.location, again.decision.location) == ("local", "local")
    assert first.decision.notice is None and not proxy.chat_requests()

    cloud = client.ask("Thanks. Now say hello.", force="cloud", **options)
    assert cloud.decision.location == "cloud" and cloud.done.outcome == "ok"
    note = "2 earlier answers of this session made from private attachments left out of what the cloud is sent"
    assert cloud.decision.notice == note and note in cloud.decision.reason
    (seen,) = proxy.chat_requests()
    sent = seen.body["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user", "assistant", "user"]
    assert sent[1]["content"] == sent[3]["content"] == WITHHELD  # the questions go, their answers do not
    body = json.dumps(seen.body)
    assert "ZX-4471" not in body
    for answer in (first.text, again.text):
        assert answer.strip() not in body or len(answer.strip()) < 4  # a word or two may recur by chance
    cloud_answer = cloud.text

    later = client.ask("And goodbye.", force="cloud", **options)  # the cloud's own answer is not private
    last = proxy.chat_requests()[-1].body["messages"]
    assert later.decision.notice == note and last[5] == {"role": "assistant", "content": cloud_answer}
    one_off = client.ask("Hello there.", force="cloud", max_tokens=4)  # another dialogue: nothing to say
    assert one_off.decision.notice is None


def test_the_judge_never_grades_answers_made_from_private_attachments(daemon_factory: Any, proxy: FaultProxy) -> None:
    # Every turn explores (the judge grades explored turns), shadow answers for every cloud turn (the judge
    # grades those too): both are local answers that read the private notes.
    config = auto_config(proxy.base_url, judge=True, explore_c=10.0, shadow="always")
    handle: DaemonHandle = daemon_factory(config, extra_env=KEY)
    client = handle.client()
    notes = Attachment("document", "notes.md", data=b"The launch code word is PELICAN-7731.", private=True)
    turns = {}
    for i in range(10):  # until an explored turn is answered locally
        result = client.ask(
            f"What is the launch code word in the notes? ({i})", attachments=[notes], max_tokens=12, temperature=0.0
        )
        turns[result.done.decision] = result
        if result.done.location == "local":  # a cloud turn that fell back was answered locally too
            break
    local = [i for i, r in turns.items() if r.done.location == "local"]  # explored: the judge would grade them
    for i in range(3):  # then one cloud answer with nothing queued behind it: its shadow answer is not preempted
        last = client.ask(f"And the code word? ({i})", attachments=[notes], force="cloud", max_tokens=12)
        turns[last.done.decision] = last
        if last.done.location == "cloud":
            break
    assert local and last.done.location == "cloud", "no local answer, or no cloud answer"

    def settled() -> bool:
        log = handle.log()
        shadowed = handle.rows("SELECT shadow FROM decisions WHERE id = ?", (last.done.decision,))[0]["shadow"]
        reasons = all(f"decision {i} is not sent to the judge: its answer was made from private" in log for i in local)
        return reasons and shadowed is not None

    wait_for(settled, 180, "every local turn's reason and the last cloud turn's shadow answer")
    rows = {r["id"]: r for r in handle.rows()}
    shadows = [json.loads(r["shadow"]) for r in rows.values() if r["shadow"]]  # some a queued user preempted
    assert shadows and all(s["grader"] == "overlap" for s in shadows)  # never the judge
    assert all(rows[i]["label_source"] != "judge" for i in local)
    bodies = [json.dumps(seen.body) for seen in proxy.chat_requests()]
    assert not any("PELICAN" in body for body in bodies)
    grading = [s for s in proxy.chat_requests() if s.body["messages"][0]["content"].startswith("You grade answers")]
    for seen in grading:  # the judge graded cloud answers only
        graded = seen.body["messages"][1]["content"]
        assert not any(f"Answer: {turns[i].text}\n" in graded for i in local if turns[i].text.strip())


def test_a_sessions_history_is_bounded_in_memory_and_upload(daemon_factory: Any, proxy: FaultProxy) -> None:
    config = cloud_config(proxy.base_url, timeout_s=60.0)
    config["daemon"] = {"max_history_chars": 3000}
    handle = daemon_factory(config, extra_env=KEY)
    client = handle.client()
    for i in range(8):
        assert client.ask(f"Turn {i}: " + "lorem ipsum " * 90, session="long", max_tokens=4).done.outcome == "ok"
    sizes = [sum(len(m["content"]) for m in seen.body["messages"][:-1]) for seen in proxy.chat_requests()]
    assert sizes[0] == 0 and max(sizes) <= 3000 and sizes[-1] > 0  # history went, within its bound
    assert proxy.chat_requests()[-1].body["messages"][0]["role"] == "user"
    assert "max_history_chars" in handle.cli("config", "show").stdout


def test_a_request_no_model_can_hold_is_refused_before_its_documents_are_ranked(daemon: DaemonHandle) -> None:
    prompt = " ".join(f"w{i:06d}" for i in range(30_000))  # 240 kB: past the local model's 2048 tokens
    doc = Attachment("document", "lorem.md", data=b"lorem ipsum dolor sit amet\n\n" * 80_000)  # 2 MB
    try:
        daemon.client().ask(prompt, attachments=[doc], max_tokens=4)
        raise AssertionError("the prompt was not refused")
    except PromptTooLong as exc:
        assert "no model that may answer it holds that" in exc.message
    assert daemon.rows() == []  # refused before it was accepted


def test_ask_refuses_a_file_it_should_not_read(daemon: DaemonHandle, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big.bin"
    with big.open("wb") as f:
        f.truncate((20 << 20) + 1)  # one byte over the daemon's attachments.max_bytes
    for path, message in ((fifo, "not a regular file"), ("/dev/zero", "not a regular file"), (big, "over the")):
        done = daemon.cli("ask", "describe", "--attach", str(path), timeout=30)  # no hang, no MemoryError
        assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr
    assert daemon.rows() == []


def test_a_private_answer_a_client_sends_back_as_history_is_still_withheld(
    daemon_factory: Any, proxy: FaultProxy
) -> None:
    """An OpenAI client resends the whole conversation; once its session is gone (expired, or the daemon
    restarted) the daemon's own answer made from a private attachment comes back as the client's history.
    The daemon knows its own answers by their hash, kept in the decision log: the cloud is still not sent it."""
    config = cloud_config(proxy.base_url, timeout_s=60.0)
    handle = daemon_factory(config, extra_env=KEY)
    question = "What is the vault code? Quote the memo."
    first = handle.client().ask(question, attachments=[MEMO], force="local", max_tokens=16, temperature=0.0, seed=1)
    assert first.text.strip()
    handle.stop()
    handle = daemon_factory(config, extra_env=KEY)  # the same state directory: sessions gone, the log kept
    conversation = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "Thanks. Now say hello."},
    ]
    cloud = handle.client().ask(None, messages=conversation, force="cloud", max_tokens=8)  # type: ignore[arg-type]
    assert cloud.decision.location == "cloud"
    note = "1 earlier answer made from private attachments left out of what the cloud is sent"
    assert cloud.decision.notice == note
    sent = proxy.chat_requests()[-1].body["messages"]
    assert sent[1] == {"role": "assistant", "content": WITHHELD} and first.text not in json.dumps(sent)
    again = handle.client().ask(None, messages=conversation, force="local", max_tokens=8)  # type: ignore[arg-type]
    assert again.decision.notice is None  # the local model sees it, as ever
