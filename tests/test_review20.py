"""Review 20: this session's change read as its maintainer. The HTTP door's notice line against the
``locod`` extension and against what a client sends back, a held local answer shown after a failed
escalation, and `locod chat`'s /attach as a user types it. Real daemons (the embedded model), the loopback
cloud behind the fault proxy, the real openai SDK."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import openai
import pytest

from locod.daemon.openai_wire import notice_line, parse_completion

from .conftest import DaemonHandle, locod_command
from .faultproxy import Fault, FaultProxy
from .test_nineteenth_walk import photo_question, streamed, ui  # noqa: F401  (ui: the fixture)


def first_line(text: str) -> str:
    return text.split("\n", 1)[0]


def test_an_escalated_answer_s_notice_is_the_one_its_first_line_says(ui: tuple[DaemonHandle, openai.OpenAI]) -> None:  # noqa: F811
    """Review finding: after an escalation the text's first line gave the cloud answer's notice, while
    ``locod.notice`` still gave the dropped local answer's ("answered locally by a model that cannot see
    images"): a client reading the extension was told the wrong model answered. Both now say the answer's."""
    _, client = ui
    text, extension = streamed(client, "auto", photo_question())
    assert extension["outcome"] == "escalated", extension
    assert first_line(text) == f"[locod: {extension['notice']}]", (text, extension)
    assert extension["notice"].startswith("answered in the cloud"), extension
    whole = client.chat.completions.create(model="auto", messages=photo_question(), max_tokens=8)
    locod = (whole.model_extra or {})["locod"]
    assert locod["outcome"] == "escalated", locod
    assert first_line(whole.choices[0].message.content or "") == f"[locod: {locod['notice']}]", locod


def test_a_held_local_answer_shown_after_the_cloud_failed_says_its_image_was_not_seen(
    ui: tuple[DaemonHandle, openai.OpenAI],  # noqa: F811
    proxy: FaultProxy,
) -> None:
    """Review finding: an escalated turn whose cloud then failed showed the whole local answer it had held;
    the answer's first line (the fallback's message, which a chat UI shows in place of the notice) said so,
    but not that the local model never saw the photo, as a fallback made from the start does: the UI's user
    read a guess at the photo as seen."""
    _, client = ui
    proxy.set(Fault("status", status=500))  # every try: the escalation's cloud call fails
    whole = client.chat.completions.create(model="auto", messages=photo_question(), max_tokens=4)  # < escalate_tokens
    locod = (whole.model_extra or {})["locod"]
    assert locod["outcome"] == "fallback" and "showing the local answer it was to replace" in locod["fallback"], locod
    shown = first_line(whole.choices[0].message.content or "")
    assert shown.endswith("by a model that cannot see images (not seen: image-0)]"), shown
    # the extension's notice is the answer's: the local one's, not the failed cloud answer's
    assert locod["notice"] == "answered locally by a model that cannot see images; not seen: image-0", locod


@pytest.mark.parametrize(
    ("sent_back", "history"),
    [
        (notice_line("not seen: a[1].png") + "    indented = 'code'", "    indented = 'code'"),
        (notice_line("x") + "\nits own blank line first", "\nits own blank line first"),
        (notice_line("x").rstrip(), ""),  # an empty answer, trimmed by the UI
        ("[locod: x]\nHi", "Hi"),  # a UI that keeps one newline
        ("[locod: x]\r\n\r\n  Hi", "  Hi"),  # a browser's text field: CRLF line ends
        ("Hi [locod: x]", "Hi [locod: x]"),  # not the door's line: the model's text
    ],
)
def test_a_notice_line_sent_back_is_taken_off_and_the_answer_kept_as_written(sent_back: str, history: str) -> None:
    """Review finding: the line was taken off with every whitespace after it, so an answer that began with an
    indented code line or a blank line came back changed (and no longer matched its session's history)."""
    body = {
        "model": "auto",
        "messages": [
            {"role": "user", "content": "Q"},
            {"role": "assistant", "content": sent_back},
            {"role": "user", "content": "And?"},
        ],
    }
    assert parse_completion(body, []).messages[1]["content"] == history


def test_chat_attach_reads_a_path_as_a_shell_would(daemon_factory: Any, tmp_path: Path) -> None:
    """Review finding: `/attach ~/notes.md` said "cannot read" (no shell expands the chat's line, and
    ``ask --attach ~/notes.md`` works), and `/attach<Tab>notes.md` went to the model as a question."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "trip.md").write_text("The ferry leaves at 7:40 from pier 3.\n")
    (home / "pin.md").write_text("My bank PIN is 9911.\n")
    daemon = daemon_factory(extra_env={"HOME": str(home)})
    typed = "/attach\t~/trip.md\n/private ~/pin.md\nWhen does the ferry leave?\n"
    shown = daemon.cli("chat", "--max-tokens", "2", stdin=typed, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert "cannot read" not in shown.stderr, shown.stderr
    (row,) = daemon.rows()
    assert "trip.md" in row["attachments_offered"] and "pin.md" in row["attachments_offered"], row


def test_chat_says_a_question_s_files_are_dropped_when_one_vanished(daemon: DaemonHandle, tmp_path: Path) -> None:
    """Review finding: a file deleted between its /attach and the question refused the question, and the
    other files attached with it were dropped with no word: the user asked again without them."""
    (tmp_path / "kept.md").write_text("The ferry leaves at 7:40.\n")
    (tmp_path / "gone.md").write_text("Pier 3.\n")
    chat = subprocess.Popen(
        locod_command("--config", str(daemon.config_path), "chat", "--max-tokens", "2"),
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=daemon.env,
    )
    assert chat.stdin is not None and chat.stderr is not None
    chat.stdin.write(f"/attach {tmp_path / 'kept.md'} {tmp_path / 'gone.md'}\n")
    chat.stdin.flush()
    said = [chat.stderr.readline() for _ in range(3)]  # the banner, then one line a file
    assert "gone.md: attached to the next question" in said[-1], said
    (tmp_path / "gone.md").unlink()
    _, rest = chat.communicate("When does the ferry leave?\n", timeout=300)
    assert chat.returncode == 0, rest
    assert "gone.md: cannot read" in rest and "its files are dropped: /attach again" in rest, rest
    assert daemon.rows() == []  # never asked
