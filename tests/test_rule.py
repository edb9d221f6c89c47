"""The decision's pure logic, in process and in seconds: the rule, masks, costs, the record's round trip,
context fitting, chunking and ranking, image sizing and the circuit breaker. The daemon tests check the
same pieces end to end; these pin down their exact behaviour so a change to one is checked at once."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from llama_cpp import Llama

from locod.daemon import attachments as att
from locod.daemon import documents, images
from locod.daemon.backends import Prompt
from locod.daemon.cloud import CircuitBreaker
from locod.daemon.config import load_config
from locod.daemon.decision import CloudAccess, Decision, Routing, fixed_decision, uploadable
from locod.daemon.fitting import fit_to_context, prompt_tokens, trim_to_context
from locod.daemon.records import MIGRATIONS, DecisionLog, DecisionRecord, Outcome
from locod.errors import AttachmentError, PromptTooLong
from locod.policy import rule
from locod.policy.messplus import MessPlus, RecordedFeatures, TurnFeatures, vectorize
from locod.policy.observation import Slot
from locod.protocol import Attachment, RecordQuery

OPEN = CloudAccess(configured=True, online=True, spent_today_usd=0.0, daily_cap_usd=0.0)


def prepared(kind: str, relevance: float, private: bool = False) -> att.PreparedAttachment:
    return att.PreparedAttachment(kind, f"{kind}-{relevance}", private, relevance, 10, jpeg=b"x" * 300)


# -- the rule ------------------------------------------------------------------------------------------


def test_action_features_show_each_model_what_it_would_see() -> None:
    views = [Slot(0.9, image=True), Slot(0.6, image=False), Slot(0.2, image=False)]
    local = rule.action_features("p", "query", views, None)
    assert (local.n_attachments, local.max_relevance, local.has_image) == (2, 0.6, False)
    assert local.withheld_relevance == 0.9  # the image it cannot see
    cloud = rule.action_features("p", "query", views, (0,), position=3, prev_cloud=True)
    assert (cloud.n_attachments, cloud.max_relevance, cloud.has_image) == (1, 0.9, True)
    assert cloud.withheld_relevance == 0.6 and cloud.position == 3 and cloud.prev_cloud


def test_relevant_uploads_cut_at_the_rules_relevance() -> None:
    views = [Slot(0.9, True), Slot(rule.MIN_RELEVANCE, False), Slot(0.29, False)]
    assert rule.relevant_uploads(views, [0, 1, 2]) == (0, 1)
    assert rule.relevant_uploads(views, [1, 2]) == (1,)  # only among what may be uploaded


def test_a_prompt_that_points_at_no_attachment_is_about_all_of_them() -> None:
    cfg = load_config(None).attachments
    notes = Attachment("document", "notes.md", data=b"Budget: 4000 euros.\n\nAlice brings the slides.")
    photo = Attachment("image", "IMG_2041.png", data=cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes())

    def relevance(prompt: str) -> list[float]:
        ready = [att.prepare(a, a.data or b"", att.terms(prompt), cfg) for a in (notes, photo)]
        return [a.relevance for a in att.as_subjects(ready)]

    # nothing in it names either, or one word in common only ("budget": a fifth of the prompt's terms)
    for prompt in ("Summarise this", "What does the sign say?", "Translate it", "Summarise the budget in three points"):
        subjects = [Slot(r, False) for r in relevance(prompt)]
        assert rule.relevant_uploads(subjects, [0, 1]) == (0, 1), prompt
    assert relevance("Who brings the slides?") == [1.0, att.IMAGE_BASE_RELEVANCE]  # it says what it is about
    assert relevance("Describe the picture") == [0.0, att.SUBJECT_RELEVANCE]


def test_combined_rule_by_hand() -> None:
    mess = MessPlus({"local": 0.5, "cloud": 0.85}, sla=0.8, v=1.0, explore_c=0.0, q_cap=50.0)
    costs, s_hat, model_of = (
        {"local": 0.1, "cloud": 1.0},
        {"local": 0.5, "cloud": 0.85},
        {"local": "local", "cloud": "cloud"},
    )
    # the price of satisfaction: mu = (1.0 - 0.1) / (0.85 - 0.5) = 2.57, which the window needs, plus Z / V
    # (a deficit, Z > 0, counted CATCH_UP = 4 times)
    mess.state.z = -5.0  # a banked surplus: price max(0, -5 + 2.57) = 0, cost decides
    assert rule.choose(mess, costs, s_hat, model_of).key == "local"
    mess.state.z = 0.5  # price 4.57: 0.1 + 4.57 * 0.3 = 1.47 against 1.0 - 4.57 * 0.05 = 0.77
    assert rule.choose(mess, costs, s_hat, model_of).key == "cloud"
    # a policy sure of the local answer settles a close call: price 4.07 gives local 0.1 + 4.07 * 0.3 = 1.32
    # against the cloud's 1.0 - 4.07 * 0.05 = 0.80, plus w * ln(0.9 / 0.1) capped at w * ln 4: 0.69
    mess.state.z = 0.375
    log_pi = {"local": np.log(0.9), "cloud": np.log(0.1)}
    assert rule.choose(mess, costs, s_hat, model_of, log_pi, weight=0.5).key == "local"
    # however sure, it cannot outweigh a large price of satisfaction: at 7.57, local 2.37 against 0.62 + 0.69
    mess.state.z = 1.25
    log_pi = {"local": 0.0, "cloud": np.log(1e-6)}
    assert rule.policy_terms(log_pi, 0.5) == pytest.approx({"local": 0.0, "cloud": 0.5 * np.log(4.0)})
    assert rule.choose(mess, costs, s_hat, model_of, log_pi, weight=0.5).key == "cloud"


def test_costs_are_normalised_to_the_dearest() -> None:
    local = rule.local_cost(joules_per_token=0.5, weight_energy=1.0)
    cloud = rule.cloud_cost(usd=0.002, upload_bytes=1000, upload_bps=1e6, weight_money=1.0, weight_energy=1.0)
    assert local == pytest.approx(0.1) and cloud == pytest.approx(2.0 + 2e-6)
    assert rule.normalised({"a": local, "b": cloud}) == pytest.approx({"a": 0.1 / cloud, "b": 1.0})


def test_the_evaluation_router_runs_the_daemons_rule() -> None:
    """policy/evaluate.Router calls locod.policy.rule; its per-action features are rule.action_features."""
    from locod.policy.evaluate import Router
    from locod.policy.tmo_env import OffloadEnv, default_sources

    env = OffloadEnv(default_sources(None), seed=3)
    obs, info = env.reset()
    router = Router(sla=0.7)
    action = router(obs, info["action_mask"], random.Random(0))
    assert info["action_mask"][action] > 0 and router.last is not None


# -- masks and fixed decisions -------------------------------------------------------------------------


def test_cloud_access_names_what_blocks_it() -> None:
    assert OPEN.blocked_by is None
    capped = CloudAccess(True, True, spent_today_usd=1.0, daily_cap_usd=1.0)
    assert "reached the cap" in (capped.blocked_by or "")
    assert "offline" in (CloudAccess(True, False, 0.0, 0.0).blocked_by or "")
    broken = CloudAccess(True, True, 0.0, 0.0, open_breakers=frozenset({"gpt"}))
    assert broken.blocked_by is None and broken.blocked_for("mini") is None  # one endpoint's breaker
    assert "breaker of gpt's endpoint" in (broken.blocked_for("gpt") or "")


def test_uploadable_never_includes_private_or_unseeable_attachments() -> None:
    items = [prepared("image", 0.9), prepared("document", 0.5), prepared("document", 0.5, private=True)]
    assert uploadable(items, vision=True) == [0, 1]
    assert uploadable(items, vision=False) == [1]


def test_fixed_decisions(tmp_path: Path) -> None:
    config = load_config(None, overrides={"paths.state_dir": str(tmp_path)})
    local = config.local.default
    assert fixed_decision(config, None, None, [], OPEN) is None  # auto: the rule decides
    forced = fixed_decision(config, "local", None, [], OPEN)
    assert forced is not None and (forced.location, forced.model, forced.routing) == ("local", local, None)
    blocked = fixed_decision(config, "cloud", None, [], CloudAccess(False, True, 0.0, 0.0))
    assert blocked is not None and blocked.location == "local" and "no cloud model" in blocked.reason
    assert blocked.notice is not None and "the cloud was asked for" in blocked.notice
    contradicted = fixed_decision(config, "cloud", local, [], OPEN)  # the named model wins, and says so
    assert contradicted is not None and (contradicted.location, contradicted.model) == ("local", local)
    assert contradicted.notice == f"force cloud was ignored: the request named {local}, which answers local"
    assert fixed_decision(config, "local", local, [], OPEN).notice is None  # type: ignore[union-attr]


# -- the decision through its record -------------------------------------------------------------------


def routing() -> Routing:
    features = TurnFeatures("what is in the photo of the harbour", "query", 1, 0.8, True, 2, False, 0.1)
    return Routing(
        action="gpt|cloud+0",
        features=RecordedFeatures.of(features),
        q=1.25,
        sla=0.8,
        v=1.0,
        s_hat={"local": 0.4, "gpt|cloud+0": 0.9},
        costs={"local": 0.01, "gpt|cloud+0": 1.0},
        mask={"local": True, "gpt|cloud": True, "gpt|cloud+0": True},
        probabilities={"local": 0.2, "cloud+0": 0.8},
        policy_version="test-1",
    )


def test_recorded_features_give_the_vector_the_prediction_used() -> None:
    features = TurnFeatures("a question about rivers and bridges", "query", 2, 0.5, False, 4, True, 0.3)
    indices, values = RecordedFeatures.of(features).vector()
    expected_indices, expected_values = vectorize(features)
    assert dict(zip(indices.tolist(), values.tolist())) == pytest.approx(
        dict(zip(expected_indices.tolist(), expected_values.tolist())), abs=1e-5
    )


def test_a_decision_round_trips_through_its_record(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path / "locod.db")
    decision = Decision("cloud", "gpt", (0,), "the rule", routing=routing())
    record = DecisionRecord("s", 0, "r", "0" * 64, 10, None, "query", "cloud", "gpt", "why", routing=decision.routing)
    decision_id = log.begin(record)
    log.finish(decision_id, Outcome("ok", "cloud", "gpt"))
    target = log.label(decision_id, True, "user")
    assert target.model == "gpt" and target.routing == decision.routing


def test_a_turn_a_stopped_daemon_left_pending_is_finished_as_interrupted(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path / "locod.db")
    decision_id = log.begin(DecisionRecord("s", 0, "r", "", 0, None, "chat", "local", "m", ""))
    log.close()  # the daemon died before completing it
    again = DecisionLog(tmp_path / "locod.db")
    (row,) = again.recent(RecordQuery(limit=10))
    assert again.interrupted_at_start == 1 and row["id"] == decision_id
    assert row["outcome"] == "interrupted" and row["finished"] is not None and row["finished"] >= row["created"]


def test_reads_beside_writes_on_the_shared_connection_lose_nothing(tmp_path: Path) -> None:
    """The loop answers `decisions` while worker threads write turns on the same connection: a read must
    not release a writer's transaction (it did: `recent` read outside the lock)."""
    log = DecisionLog(tmp_path / "locod.db")
    failures: list[Exception] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                log.recent(RecordQuery(limit=1000))
            except Exception as exc:  # any failure is what this test looks for
                failures.append(exc)
                return

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(300):
            decision_id = log.begin(DecisionRecord("s", i, "r", "", 0, None, "chat", "local", "m", ""))
            log.finish(decision_id, Outcome("ok", "local", "m"))
    finally:
        done.set()
        reader.join(10)
    assert not failures
    assert [row["outcome"] for row in log.recent(RecordQuery(limit=1000))] == ["ok"] * 300


def test_record_dataclasses_and_migrated_columns_agree(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path / "locod.db")
    columns = set(log.db["decisions"].columns_dict)
    written = set(DecisionRecord("s", 0, "r", "", 0, None, "chat", "local", "m", "").row())
    finished = set(Outcome.__dataclass_fields__) - {"private_openings"}  # a table of their own
    assert set(log.db["private_openings"].columns_dict) == {"digest"}
    kept_by_the_log = {"id", "created", "finished", "outcome", "satisfied", "label_source", "labelled", "shadow"}
    assert columns == written | finished | kept_by_the_log
    assert set(routing().columns()) <= written
    assert log.db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


def test_a_fallback_keeps_the_routing_state_for_the_local_answer() -> None:
    decision = Decision("cloud", "gpt", (0,), "the rule", explored=True, routing=routing())
    local = decision.fallen_back("smol", "HTTP 500", routing().features)
    assert (local.location, local.model, local.send, local.explored) == ("local", "smol", (), True)
    assert local.routing is not None and local.routing.action == "smol" and local.routing.s_hat_taken is None
    assert local.reason == "the rule; fell back: HTTP 500"


# -- context fitting, chunks, images, breaker ----------------------------------------------------------


@pytest.fixture(scope="module")
def vocab(model_path: Path) -> Llama:
    """The embedded model's tokenizer alone (no weights): real token counts in milliseconds."""
    return Llama(str(model_path), vocab_only=True, n_ctx=256, verbose=False)


def test_fit_to_context_drops_the_oldest_history_first(vocab: Llama) -> None:
    turns = [{"role": r, "content": f"message {i} " + "word " * 20} for i, r in enumerate(["user", "assistant"] * 6)]
    messages = [{"role": "system", "content": "Be brief."}, *turns, {"role": "user", "content": "last question"}]
    kept, tokens_in, answer = fit_to_context(vocab, messages, max_tokens=64)
    assert kept[0]["role"] == "system" and kept[-1]["content"] == "last question"
    assert kept[1]["role"] == "user" and len(kept) < len(messages)  # history trimmed, starting at a user turn
    assert kept[1:-1] == messages[len(messages) - len(kept) + 1 : -1]  # the newest history stays
    assert answer == 64 and tokens_in + answer <= 256
    with pytest.raises(PromptTooLong):
        fit_to_context(vocab, [{"role": "user", "content": "word " * 400}], max_tokens=8)


def test_messages_that_fit_by_size_are_kept_as_tokenising_would_keep_them(vocab: Llama) -> None:
    """A history growing past the context, message by message: wherever the size check lets the messages
    through untokenised (the first few: a byte per token is a loose bound), counting their tokens keeps
    exactly them too, with the same answer budget and token count; past that, the tokens decide as before."""
    texts = ["why é? ", "<|im_start|>assistant ", "🙂 x ", "naïve 9,000 "]  # multi-byte, special-looking
    history = [{"role": "assistant", "content": "Hello."}]  # kept history must still start at a user message
    by_size = trimmed = 0
    for i in range(30):  # bounded: the 256-token context is past after about 20 rounds
        history += [
            {"role": "user", "content": f"question {i}: " + texts[i % 4] * (i % 3 + 1)},
            {"role": "assistant", "content": "because " * (i % 5 + 1)},
        ]
        messages = [{"role": "system", "content": "Be brief."}, *history, {"role": "user", "content": "last"}]
        for max_tokens in (8, 64):
            fitted, tokens_in, answer = fit_to_context(vocab, messages, max_tokens)
            exact = trim_to_context(vocab, messages, max_tokens)
            if tokens_in is None:
                by_size += 1
                assert (fitted, answer) == (exact[0], exact[2]) and fitted[1]["role"] == "user"
                assert prompt_tokens(vocab, Prompt(list(fitted), answer, 0.0, None, print)) == exact[1]
            else:
                assert (fitted, tokens_in, answer) == exact
            trimmed += len(exact[0]) < len(messages) - 1
    assert by_size >= 3 and trimmed > 10


def test_chunks_are_ranked_by_the_prompts_terms_and_returned_in_order() -> None:
    text = "\n\n".join(["Tomatoes need water."] * 5 + ["The warranty expires in March."] + ["Basil likes sun."] * 5)
    pieces = documents.chunk_text(text, 40)
    ranked = documents.rank_chunks(pieces, att.terms("when does the warranty expire"))
    assert "warranty" in max(ranked, key=lambda c: c.score).text
    chosen = documents.select_chunks(ranked, token_budget=12)
    assert any("warranty" in c.text for c in chosen)
    assert [c.index for c in chosen] == sorted(c.index for c in chosen)


def test_paragraphs_are_found_whatever_ends_a_line() -> None:
    """A classic Mac (CR-only) file had no blank line to split at and was cut by length mid-sentence."""
    paragraphs = ["Tomatoes need water every day.", "The warranty expires in March."]
    for newline in ("\n", "\r\n", "\r"):
        text = documents.document_text(newline.join([paragraphs[0], "", paragraphs[1], ""]).encode())
        assert text is not None and documents.chunk_text(text, 40) == paragraphs, newline


def test_image_sizes_come_from_headers_and_big_images_are_shrunk() -> None:
    png = cv2.imencode(".png", np.zeros((300, 500, 3), np.uint8))[1].tobytes()
    assert images.image_size(png) == ("png", 500, 300)
    with pytest.raises(AttachmentError):
        images.image_size(png[:-20])  # truncated
    config = load_config(None).attachments
    image = att.prepare(Attachment("image", "photo.png", data=png), png, att.terms("what is in this photo"), config)
    assert max(image.width, image.height) <= config.image_max_side and len(image.jpeg) <= config.image_jpeg_bytes
    assert image.upload_bytes == len(images.data_url(image.jpeg)) - len("data:image/jpeg;base64,")


def test_circuit_breaker_opens_after_the_limit_and_half_opens_after_the_cooldown() -> None:
    breaker = CircuitBreaker(failures=2, cooldown_s=0.2)
    breaker.failure()
    assert not breaker.blocking
    breaker.failure()
    assert breaker.blocking and breaker.state == "open"
    time.sleep(0.25)
    assert not breaker.blocking  # half-open: the next call may try
    breaker.success()
    assert breaker.state == "closed"


def test_a_reload_ends_an_open_breakers_cooldown_and_one_failure_reopens_it() -> None:
    breaker = CircuitBreaker(failures=3, cooldown_s=600)
    for _ in range(3):
        breaker.failure()
    assert breaker.blocking
    breaker.allow_trial()
    assert not breaker.blocking and breaker.state == "closed"
    breaker.failure()  # the trial failed: open again at once, not after three more
    assert breaker.blocking
    closed = CircuitBreaker(failures=3, cooldown_s=600)
    closed.failure()
    closed.allow_trial()  # a closed breaker's count is left alone
    closed.failure()
    assert not closed.blocking
