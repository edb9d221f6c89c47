"""Walk 33: a user who does not write English. Chinese, Japanese, Arabic, Hindi, Russian and emoji through
the command line and the decision log it reads back: each test is a place where such text came out wrong."""

from __future__ import annotations

import json
import unicodedata
from typing import Any

import pytest

from locod.client import Client
from locod.daemon.sessions import WITHHELD
from locod.errors import AttachmentError
from locod.protocol import Attachment, DeltaFrame

from .conftest import SECRET, DaemonHandle, cloud_config, wait_for
from .faultproxy import FaultProxy

SESSIONS = ("会议记录", "नमस्ते", "notes")


def on_screen(text: str) -> int:
    """The columns a terminal gives ``text``: two for a CJK character, none for a Devanagari vowel sign."""
    return sum(
        0 if unicodedata.category(c) == "Mn" else 2 if unicodedata.east_asian_width(c) == "W" else 1 for c in text
    )


def test_decisions_table_stays_aligned_under_wide_and_combining_session_names(daemon: DaemonHandle) -> None:
    """`locod decisions` padded its cells with ``str.ljust``, which counts code points: a session named
    会议记录 (four characters, eight columns on a terminal) pushed every column after it four columns right
    of its header, and नमस्ते (six code points, four columns) pulled them two left."""
    with Client(daemon.endpoint) as client:
        for session in SESSIONS:
            client.ask("Say hi.", session=session, max_tokens=2, temperature=0.0)
    listed = daemon.cli("decisions")
    assert listed.returncode == 0, listed.stderr
    header, *lines = listed.stdout.splitlines()
    turn_at = on_screen(header[: header.index("turn")])
    assert len(lines) == len(SESSIONS)
    for line, session in zip(lines, SESSIONS):
        after = line.index(session) + len(session)
        turn = after + len(line[after:]) - len(line[after:].lstrip(" "))  # the first cell after the session's
        assert on_screen(line[:turn]) == turn_at, line


MEMO = Attachment("document", "备忘录.md", data="保险库密码是ZX4471。".encode(), private=True)
QUOTED = "保险库密码是ZX4471请妥善保管不要告诉任何人"


def test_the_part_of_a_private_chinese_answer_a_user_stopped_is_still_withheld(
    daemon_factory: Any, proxy: FaultProxy
) -> None:
    """A private answer is known again by the digests of its opening words, split at whitespace: a Chinese
    answer, written without spaces, was one word and had no opening, so the part a user stopped and a chat
    UI sent back went to the cloud in full. Its characters are its words now, as a Latin answer's words are."""
    handle = daemon_factory(cloud_config(proxy.base_url, timeout_s=60.0), extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    question = "密码是多少？请引用备忘录。"
    received = ""
    frames = handle.client().chat(
        question,
        attachments=[MEMO],
        force="local",
        max_tokens=80,
        temperature=0.0,
        response_format={"type": "json_schema", "json_schema": {"name": "quote", "schema": {"const": QUOTED}}},
    )  # the schema holds the small model to a Chinese answer, a JSON string without a space in it
    for frame in frames:
        received += frame.text if isinstance(frame, DeltaFrame) else ""
        if "保险库密码" in received:
            break  # the user presses stop
    frames.close()
    assert "保险库密码" in received and QUOTED not in received
    wait_for(lambda: [r for r in handle.rows() if r["outcome"] != "pending"], 60, "the turn to end")
    conversation = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": received},
        {"role": "user", "content": "谢谢。现在说你好。"},
    ]
    cloud = handle.client().ask(None, messages=conversation, force="cloud", max_tokens=4)  # type: ignore[arg-type]
    assert cloud.decision.location == "cloud"
    (seen,) = proxy.chat_requests()
    assert seen.body["messages"][1] == {"role": "assistant", "content": WITHHELD}
    assert received.strip() not in json.dumps(seen.body, ensure_ascii=False)


def test_a_russian_prompt_scores_its_documents_by_their_words(daemon: DaemonHandle) -> None:
    """A document's relevance came from the prompt's ``[a-z0-9]+`` words: a Russian (or Chinese, Hindi,
    Arabic) prompt had none, pointed at no document, and so every document of its turn was taken as its
    subject (0.7, uploaded to a cloud model), the recipe beside the meeting note, each one's excerpt its
    opening. Words of any script count now: the note the question names is scored above the cut, the recipe
    not at all."""
    note = Attachment("document", "встреча.md", data="Встреча с юристом в среду в три часа.".encode())
    recipe = Attachment("document", "рецепт.md", data="Борщ: свёкла, капуста, картофель, лук.".encode())
    with Client(daemon.endpoint) as client:
        result = client.ask("Когда встреча с юристом?", attachments=[note, recipe], max_tokens=2, temperature=0.0)
    (row,) = daemon.rows("SELECT attachments_offered FROM decisions WHERE id = ?", (result.decision.decision,))
    relevance = {a["name"]: a["relevance"] for a in json.loads(row["attachments_offered"])}
    assert relevance["встреча.md"] >= 0.3 and relevance["рецепт.md"] == 0.0, relevance


def test_a_chinese_or_japanese_text_file_in_its_own_encoding_is_refused_with_how_to_convert_it(
    daemon: DaemonHandle,
) -> None:
    """A text file saved as GB18030 or Shift-JIS (what Chinese and Japanese Windows write) was refused as
    "not UTF-8 text ...; convert it to text first": to its user it is text. The refusal now says to convert
    it to UTF-8, and how."""
    with Client(daemon.endpoint) as client:
        for name, data in (
            ("会议笔记.txt", "会议定在周三。".encode("gb18030")),
            ("メモ.txt", "会議は水曜日。".encode("shift_jis")),
        ):
            with pytest.raises(AttachmentError) as refused:
                client.ask("总结", attachments=[Attachment("document", name, data=data)], max_tokens=2)
            said = refused.value.message
            assert f"document {name!r} is not UTF-8 text" in said and "convert it to UTF-8 text first" in said, said
            assert "iconv -f GB18030 -t UTF-8" in said


def test_a_question_in_chinese_or_arabic_is_a_query(daemon: DaemonHandle) -> None:
    """The task classifier knew a question by its ASCII ``?``: a Chinese one ends in the full-width ？ and an
    Arabic one in ؟, and both were recorded (and routed, and learned from) as chat; a Russian one, ending in
    ``?``, was a query."""
    questions = ("法国的首都是哪里？", "ما هي عاصمة فرنسا؟", "Какая столица Франции?")
    with Client(daemon.endpoint) as client:
        for question in questions:
            client.ask(question, max_tokens=2, temperature=0.0)
    assert [row["task"] for row in daemon.rows()] == ["query"] * len(questions)
