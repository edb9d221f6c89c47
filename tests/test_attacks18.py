"""Attack round 18: the learning loop. Each test is a label the router learned that nothing said (a judge
reply holding both verdicts, a cloud answer without words taken as the reference a local answer disagreed
with, an old model file's answer training the file that replaced it), or a label given that never trained
(a turn whose prediction MESS+ no longer held, a turn whose record a full disk held back)."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from locod.daemon.records import DecisionLog
from locod.errors import LocodError
from locod.policy.messplus import MessPlus
from locod.protocol import DecisionFrame

from .conftest import cloud_config, fill_disk, start_daemon, wait_for
from .faultproxy import FaultProxy, serve, shut
from .test_escalation import _daemon, _head
from .test_routing import auto_config

LOCAL = "smollm2-135m-instruct"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ScriptedCloud:
    """An OpenAI-compatible endpoint on loopback whose every answer (turn or grading) is ``text``, streamed
    whole with a clean finish: a cloud or judge that says exactly what a test needs it to say."""

    def __init__(self) -> None:
        self.text = ""
        self.lock = threading.Lock()
        cloud = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._send("application/json", json.dumps({"object": "list", "data": [{"id": "cloud-small"}]}))

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with cloud.lock:
                    text = cloud.text
                events = [
                    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": None}]},
                    {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                    {"choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 2, "total_tokens": 22}},
                ]
                body = "".join(
                    "data: "
                    + json.dumps({"id": "s", "object": "chat.completion.chunk", "model": "cloud-small", **e})
                    + "\n\n"
                    for e in events
                )
                self._send("text/event-stream", body + "data: [DONE]\n\n")

            def _send(self, kind: str, body: str) -> None:
                payload = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = serve(Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def says(self, text: str) -> None:
        with self.lock:
            self.text = text


@pytest.fixture
def scripted() -> Iterator[ScriptedCloud]:
    cloud = ScriptedCloud()
    yield cloud
    shut(cloud.server)


def test_a_judge_reply_saying_both_yes_and_no_is_no_verdict(daemon_factory: Any, scripted: ScriptedCloud) -> None:
    """The judge is asked for one word, YES or NO, and its verdict was the first of them found anywhere in
    its reply: a judge that echoed the question's "YES or NO?" before answering NO (as small models do), or
    whose reply carried text injected from the graded answer, labelled the turn good and trained the router
    on it. A reply that says both is now no verdict (logged); one that says one of them still labels."""
    handle = daemon_factory(auto_config(scripted.base_url, judge=True, explore_c=10.0))  # every turn explores
    client = handle.client()

    def graded(decision: int, said: str) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            row = handle.rows("SELECT * FROM decisions WHERE id = ?", (decision,))[0]
            return row if row["satisfied"] is not None or said in handle.log() else None

        return wait_for(done, 120, f"the judge's grading of decision {decision}")  # type: ignore[no-any-return]

    scripted.says("YES or NO? NO.")
    first = client.ask("Is the sky green?", max_tokens=4).decision
    assert first.explored
    row = graded(
        first.decision, f"judge gave no verdict for decision {first.decision} (14 characters, both yes and no)"
    )
    assert row["satisfied"] is None and row["label_source"] is None
    assert client.status()["routing"]["labels"] == {}

    scripted.says("No.")
    second = client.ask("Is the sea dry?", max_tokens=4).decision
    row = graded(second.decision, f"judge gave no verdict for decision {second.decision}")
    assert row["satisfied"] == 0 and row["label_source"] == "judge"


def test_a_cloud_answer_without_words_labels_no_shadow_answer(daemon_factory: Any, scripted: ScriptedCloud) -> None:
    """A shadow answer is graded by its word overlap with the cloud's answer. A cloud answer with no words
    (an emoji, punctuation) overlaps with nothing, so every shadow answer of such a turn was labelled bad
    and trained the local model's predictor down, whatever the local model said. Now such a turn gives no
    shadow label (logged), and a cloud answer with words still grades the next one."""
    config = cloud_config(scripted.base_url, timeout_s=60.0)
    config["routing"]["shadow"] = "always"
    handle = daemon_factory(config)
    client = handle.client()

    scripted.says("\N{THUMBS UP SIGN}")
    first = client.ask("What is the capital of France?", max_tokens=8, temperature=0.0)
    assert first.decision.location == "cloud" and first.text == "\N{THUMBS UP SIGN}"
    said = f"no shadow label for decision {first.decision.decision}: the cloud's answer has no words to compare with"
    wait_for(lambda: said in handle.log() or handle.rows()[0]["shadow"], 120, "the shadow answer")
    assert handle.rows()[0]["shadow"] is None and said in handle.log()
    routing = client.status()["routing"]
    assert routing["shadow_labels"] == 0 and routing["labels"].get(LOCAL, 0) == 0

    scripted.says("Paris is the capital of France.")
    second = client.ask("What is the capital of France?", max_tokens=8, temperature=0.0).decision
    (row,) = wait_for(lambda: [r for r in handle.rows() if r["shadow"]], 120, "the second shadow answer")
    assert row["id"] == second.decision and json.loads(row["shadow"])["grader"] == "overlap"
    # its label is learned just after its grade is written to the record
    wait_for(lambda: client.status()["routing"]["shadow_labels"] == 1, 60, "the shadow label")


def test_a_label_for_a_turn_whose_pending_prediction_was_dropped_still_trains(
    daemon_factory: Any, proxy: FaultProxy, tmp_path: Path
) -> None:
    """MESS+ keeps the predictions of the last 10,000 settled turns for their labels to correct; an older one
    is dropped. The learner took a turn of this run that was not among them for one not settled yet, and
    held its label for a settling that had come and gone: stored as given and answered, it never trained the
    predictor. Here the router state holds 10,000 predictions of an earlier decision log (restored from
    another backup than the state), the first for decision 1, so this run's second turn drops the first's
    prediction as 10,000 more turns would. Now the label trains the model that answered."""
    state = tmp_path / "d" / "state"
    state.mkdir(parents=True)
    kept = MessPlus({LOCAL: 0.5, "cloud-small": 0.9}, sla=0.8, v=20.0, explore_c=0.0, q_cap=50.0)
    kept.path = state / "messplus.npz"
    for decision in (1, *range(3, 10_002)):  # not 2: this run's second turn adds its own
        kept.settle(decision, LOCAL, 0.5)
    kept.save()
    handle = daemon_factory(auto_config(proxy.base_url))
    client = handle.client()
    first = client.ask("Hi", max_tokens=2).decision
    client.ask("Hello", max_tokens=2)
    wait_for(lambda: client.status()["routing"]["turns"] == 10_002, 60, "the second turn's settling")
    before = client.status()["routing"]["labels"].get(first.model, 0)
    client.feedback(first.decision, True)
    assert client.status()["routing"]["labels"].get(first.model, 0) == before + 1


def test_an_escalated_answer_is_not_graded_against_a_cloud_answer_without_words(
    daemon_factory: Any, tmp_path: Path, scripted: ScriptedCloud
) -> None:
    """An escalated local answer is graded by its word overlap with the cloud's answer, as a shadow answer
    is: against a cloud answer without words it was labelled bad whatever it said, and counted as an
    escalation label. Now it gets no label, and a restart, which counts them from the log, agrees."""
    scripted.says("\N{THUMBS UP SIGN}")
    unsure = _head(min_weight=1000.0, bias=10.0)  # as test_escalation's: no real answer is sure enough
    handle = _daemon(daemon_factory, tmp_path, scripted, unsure, "unsure")  # type: ignore[arg-type]
    result = handle.client().ask("What is the plural of mouse?", max_tokens=24, temperature=0.0)
    assert result.escalated is not None and result.done.outcome == "escalated"
    assert json.loads(handle.rows()[0]["confidence"])["label"] is None
    routing = handle.client().status()["routing"]
    assert routing["labels"][LOCAL] == 1 and routing["escalated_labels"] == 0  # the one the head came with

    handle.stop()
    assert DecisionLog(handle.db_path).local_labels() == (0, 0)  # what the next start counts


def test_a_label_for_an_answer_of_a_replaced_model_file_trains_nothing(
    daemon_factory: Any, proxy: FaultProxy, models_dir: Path, tmp_path: Path
) -> None:
    """A local model whose name now stands for another GGUF starts its predictor over: the old file's
    competence is not the new one's. But a label that came afterwards for a turn the old file answered
    trained the new file's predictor (and confidence head) all the same. Now it corrects the queue and
    trains nothing, and the log says why; a turn the new file answered trains it, also after a restart."""
    model = tmp_path / "local.gguf"
    shutil.copy(models_dir / MODEL_FILE, model)
    config = auto_config(proxy.base_url, sla=0.05)  # local answers: its predicted satisfaction is enough
    config["local"] = {"models": [{"name": LOCAL, "path": str(model)}]}  # the embedded model's name, this file
    first = daemon_factory(config)
    old = first.client().ask("Hi", max_tokens=2).decision
    assert old.location == "local"
    first.stop()
    with model.open("ab") as f:  # a new version of another size
        f.write(bytes(4096))

    second = daemon_factory(config, name="d")
    assert f"local model {LOCAL} is now" in second.log()
    client = second.client()
    new = client.ask("Hello", max_tokens=2).decision
    assert new.location == "local"
    assert client.feedback(old.decision, True)["source"] == "user"
    assert client.status()["routing"]["predictors"][LOCAL]["labels"] == 0
    assert f"label for decision {old.decision} trains nothing" in second.log()
    second.stop()

    third = daemon_factory(config, name="d")  # the file's first decision is kept with the state
    client = third.client()
    client.feedback(new.decision, False)
    assert client.status()["routing"]["predictors"][LOCAL]["labels"] == 1


def test_a_label_for_a_turn_whose_record_a_full_disk_holds_back_says_so_and_trains_once_written(
    tmp_path: Path, models_dir: Path, small_disk: Path
) -> None:
    """A turn answered while the disk was full keeps its record's completion in memory (record_not_committed).
    A label for it was refused as for a turn "still running; label it once it has answered", which it had;
    and once the disk had room the label was stored but waited for a settling the failed turn never got,
    so it never trained. Now the refusal names the full disk, and the label sent once it has room trains."""
    handle = start_daemon(tmp_path / "d", models_dir, {}, extra_env={"LOCOD_STATE_DIR": str(small_disk)})
    filler = small_disk / "filler"
    try:
        client = handle.client()
        assert client.ask("before the disk fills", max_tokens=2).done.outcome == "ok"
        held: tuple[int, LocodError] | None = None
        for i in range(20):  # a completion written into the WAL's spare room succeeds: try again
            decision = 0
            try:
                for frame in client.chat(f"Write a long essay about the ocean, part {i}.", max_tokens=24):
                    if isinstance(frame, DecisionFrame):
                        decision = frame.decision
                        fill_disk(filler)
            except LocodError as exc:
                held = decision, exc
                break
            filler.unlink()
        assert held is not None and held[1].code == "record_not_committed", held
        with pytest.raises(LocodError) as refused:
            client.feedback(held[0], True)
        assert refused.value.code == "disk_full" and "was answered" in refused.value.message, refused.value
        filler.unlink()
        labels = client.status()["routing"]["labels"].get(LOCAL, 0)
        assert client.feedback(held[0], True)["satisfied"] is True
        assert client.status()["routing"]["labels"].get(LOCAL, 0) == labels + 1
    finally:
        filler.unlink(missing_ok=True)
        handle.stop()
