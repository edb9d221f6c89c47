"""The nineteenth walk: a chat web UI (Open WebUI, LibreChat, Chatbox) pointed at the HTTP door as an
"OpenAI-compatible connection", behaving as such a UI does with the real openai SDK: it shows the answer's
text and nothing of the ``locod`` extension. One real daemon (the embedded model) routing to the loopback
cloud behind the fault proxy, with a local confidence head that escalates every routed answer."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from .conftest import DaemonHandle, free_port
from .faultproxy import Fault, FaultProxy
from .test_escalation import _daemon, _head
from .test_http import LOCAL, png


@pytest.fixture
def ui(daemon_factory: Any, tmp_path: Path, proxy: FaultProxy) -> Iterator[tuple[DaemonHandle, openai.OpenAI]]:
    port = free_port()
    head = _head(min_weight=1000.0, bias=10.0)  # every routed local answer is unsure: the cloud answers instead
    handle = _daemon(
        daemon_factory, tmp_path, proxy, head, "ui", {"weight_policy": 0.0}, http={"listen": f"127.0.0.1:{port}"}
    )
    yield (
        handle,
        openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="set-in-the-ui", max_retries=0, timeout=180),
    )


def photo_question() -> Any:  # the SDK types its messages; a UI sends JSON
    url = "data:image/png;base64," + base64.b64encode(png()).decode()
    question = [{"type": "text", "text": "What colour is this?"}, {"type": "image_url", "image_url": {"url": url}}]
    return [{"role": "user", "content": question}]


def streamed(client: openai.OpenAI, model: str, messages: Any) -> tuple[str, dict[str, Any]]:
    """(the text a UI shows, the ``locod`` extension it ignores)."""
    text, extension = "", dict[str, Any]()
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=8, stream=True):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        extension = (chunk.model_extra or {}).get("locod") or extension
    return text, extension


def test_a_ui_shows_that_its_image_was_not_seen(ui: tuple[DaemonHandle, openai.OpenAI]) -> None:
    """Walk finding: a photo sent to the local model (which reads no images) was answered as if seen, and the
    notice saying so was only in ``locod.notice``, which a chat UI does not show: its user read a made-up
    description of the photo. The notice is now the answer's first line, streamed or whole; sent back with
    the history, it is taken off again, so the model does not copy it and the session continues."""
    _, client = ui
    notice = "[locod: answered locally by a model that cannot see images; not seen: image-0]\n\n"
    whole = client.chat.completions.create(model=LOCAL, messages=photo_question(), max_tokens=8)
    answer = whole.choices[0].message.content or ""
    assert answer.startswith(notice) and len(answer) > len(notice), answer
    text, extension = streamed(client, LOCAL, photo_question())
    assert text.startswith(notice) and extension["notice"] == notice[8:-3], text
    history = [*photo_question(), {"role": "assistant", "content": answer}, {"role": "user", "content": "Thanks"}]
    after, continued = streamed(client, LOCAL, history)
    assert after and not after.startswith("["), after  # no image in this turn: nothing to say, nor copied
    # the line is the door's, not the model's: taken off what comes back, the history is the session's own
    assert continued["session"] == (whole.model_extra or {})["locod"]["session"]
    plain = client.chat.completions.create(model=LOCAL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert not (plain.choices[0].message.content or "").startswith("[")


def test_a_ui_shows_that_an_escalated_answer_was_made_without_its_image(
    ui: tuple[DaemonHandle, openai.OpenAI], proxy: FaultProxy
) -> None:
    """Walk finding: with ``auto``, the unsure local answer escalated to a cloud answer made without the photo
    too; the escalation said so only in ``locod.escalated``, so the UI showed the cloud's guess at a photo it
    never got. The escalated frame now carries the cloud answer's notice, and the HTTP door writes it as the
    answer's first line (the decision's notice was the dropped local answer's, and is not shown)."""
    _, client = ui
    text, extension = streamed(client, "auto", photo_question())
    assert extension["outcome"] == "escalated", extension
    assert isinstance(proxy.chat_requests()[-1].body["messages"][-1]["content"], str)  # the cloud got no image
    assert extension["escalated"].endswith("; not uploaded, so not seen: image-0"), extension
    assert text.startswith("[locod: answered in the cloud without uploading every image; not seen: image-0]\n\n"), text
    whole = client.chat.completions.create(model="auto", messages=photo_question(), max_tokens=8)
    assert (whole.choices[0].message.content or "").startswith("[locod: answered in the cloud without uploading")


def test_a_ui_shows_that_the_cloud_it_named_failed_and_the_local_model_answered(
    ui: tuple[DaemonHandle, openai.OpenAI], proxy: FaultProxy
) -> None:
    """Walk finding: a UI user who picked the cloud model got the local model's answer when the cloud failed
    before any text, with nothing in the text to say so (the fallback's message was in ``locod.fallback``
    alone). Its message is now the answer's first line; sent back, it is taken off again."""
    _, client = ui
    proxy.set(Fault("status", status=500))  # every try, so every retry fails
    question: Any = [{"role": "user", "content": "Name a colour."}]
    text, extension = streamed(client, "cloud-small", question)
    assert extension["outcome"] == "fallback" and extension["location"] == "local", extension
    assert text.startswith("[locod: the cloud answer failed (") and "answering locally" in text.split("\n")[0], text
    history = [*question, {"role": "assistant", "content": text}, {"role": "user", "content": "Another."}]
    after = client.chat.completions.create(model=LOCAL, messages=history, max_tokens=4)
    assert (after.model_extra or {})["locod"]["session"] == extension["session"]  # the session's own history
