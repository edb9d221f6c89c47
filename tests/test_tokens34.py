"""Tokens estimated from text in any script. Every estimate counted four characters a token, as English
takes: Chinese, Japanese and Korean take about a token a character, Hindi, Thai, Arabic and Cyrillic several
times English's per character. So for a user writing in them the daily cap's hold and the price of an answer
without ``usage`` were several times too low, and a document's excerpt "within doc_token_budget" several
times over it. Real daemon, real SQLite, the loopback cloud (the embedded model behind ``llama_cpp.server``)
behind the recording proxy, whose answers' ``usage`` is stripped; real token counts are the embedded model's
own tokenizer's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from llama_cpp import Llama

from locod.client import attachment
from locod.policy.rule import estimate_tokens, prefix_within

from .conftest import SECRET, cloud_config
from .faultproxy import Fault, FaultProxy

PRICE_IN = 100.0  # USD a million input tokens: $0.0001 a token; output free, so a turn's price is its prompt's
NO_USAGE = Fault(kind="usage", usage=None)  # the real answer, relayed without its token counts

# One request, in each script, of about the same meaning.
SAMPLES = {
    "English": "Please summarise the attached meeting notes and list the decisions we made about the budget.",
    "Chinese": "请总结附件中的会议记录，并列出我们关于下个季度预算所做的决定。",
    "Japanese": "添付の会議メモを要約して、来四半期の予算について決めたことを一覧にしてください。",
    "Korean": "첨부된 회의록을 요약하고 다음 분기 예산에 대해 우리가 내린 결정을 나열해 주세요.",
    "Russian": "Пожалуйста, кратко изложите прилагаемые заметки о встрече и перечислите принятые решения.",
    "Arabic": "يرجى تلخيص ملاحظات الاجتماع المرفقة وسرد القرارات التي اتخذناها بشأن ميزانية الربع القادم.",
    "Hindi": "कृपया संलग्न बैठक के नोट्स का सारांश दें और बजट के बारे में लिए गए निर्णयों की सूची बनाएं।",
    "Thai": "กรุณาสรุปบันทึกการประชุมที่แนบมาและระบุการตัดสินใจที่เราทำเกี่ยวกับงบประมาณ",
    "emoji": "🎉🎉 Party time! 🥳🍕 See you there 👋😀",
    "code": "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }",
}
CHINESE_QUESTION = "请详细说明项目计划中关于预算、招聘和差旅的安排，并列出每一项的负责人和截止日期。" * 3


@pytest.fixture(scope="module")
def vocab(model_path: Path) -> Llama:
    """The embedded model's tokenizer alone (no weights)."""
    return Llama(str(model_path), vocab_only=True, n_ctx=256, verbose=False)


def tokens(vocab: Llama, text: str) -> int:
    return len(vocab.tokenize(text.encode(), add_bos=False, special=False))


def test_the_estimate_counts_every_script_near_a_real_tokenizer(vocab: Llama) -> None:
    """At four characters a token the embedded model's tokenizer counted a Chinese request at 7 times its
    estimate, Korean at 8, emoji at 7, code at 2. The estimate now reads the text. The embedded model is
    English-only, the most any tokenizer measured counts these scripts at (Korean 2.5 a syllable; GPT-4's,
    Llama 3's, Qwen's count 0.6 to 1.1, below the estimate: docs/routing.md): even so the estimate is at
    least half its count in every script, and English is not counted at more than half again its tokens."""
    for script, text in SAMPLES.items():
        real, estimated = tokens(vocab, text), estimate_tokens(text)
        assert estimated >= 0.5 * real, (script, estimated, real)
    english = SAMPLES["English"]
    assert estimate_tokens(english) <= 1.5 * tokens(vocab, english)


def test_a_prefix_within_a_budget_is_the_longest_the_estimate_allows() -> None:
    text = SAMPLES["Chinese"] + SAMPLES["English"]
    for budget in (0, 1, 7, 30, 1000):
        cut = prefix_within(text, budget)
        assert text.startswith(cut) and estimate_tokens(cut) <= budget
        assert cut == text or estimate_tokens(text[: len(cut) + 1]) > budget


def test_a_chinese_turn_is_held_against_the_cap_as_an_english_one_of_its_tokens_is(
    daemon_factory: Any, proxy: FaultProxy, vocab: Llama
) -> None:
    """What is left of the cap is half what either question's tokens cost. The English turn was kept local;
    the Chinese one of the same tokens was estimated at a seventh of them, went to the cloud, and spent
    twice what was left (the cap passed). Now both are kept local, and say why."""
    sentence = "Please explain in detail the budget, hiring and travel arrangements of the project plan. "
    english = sentence * round(tokens(vocab, CHINESE_QUESTION) / tokens(vocab, sentence))
    assert abs(tokens(vocab, english) - tokens(vocab, CHINESE_QUESTION)) < 0.1 * tokens(vocab, english)
    cap = tokens(vocab, CHINESE_QUESTION) * PRICE_IN / 1e6 / 2
    config = cloud_config(proxy.base_url, timeout_s=300.0, daily_cap_usd=cap)
    config["cloud"]["models"][0].update(usd_per_mtok_in=PRICE_IN, usd_per_mtok_out=0.0)
    handle = daemon_factory(config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    proxy.set(NO_USAGE)
    client = handle.client()
    for question in (english, CHINESE_QUESTION):
        result = client.ask(question, max_tokens=4)
        assert result.decision.location == "local", question
        assert "daily_cap_usd" in (result.decision.notice or ""), result.decision.notice
    assert proxy.chat_requests() == []
    assert sum(r["cost_usd"] or 0.0 for r in handle.rows()) <= cap


def test_a_chinese_answer_without_usage_is_priced_at_its_tokens_and_its_excerpt_within_the_budget(
    daemon_factory: Any, proxy: FaultProxy, vocab: Llama, tmp_path: Path
) -> None:
    """A cloud answer whose endpoint reports no usage is priced from its text: a Chinese question was
    counted at a seventh of the tokens the endpoint read, recorded as spent and against the cap. And the
    excerpt of a Chinese document sent within doc_token_budget (200) was 1,335 of the endpoint's tokens.
    Now the price counts at least three quarters of what was sent, and the excerpt keeps near its budget
    (the embedded model's tokenizer counts Chinese at about 1.8 a character, multilingual ones at 0.6 to
    1.1: the estimate's 1.5 is a sixth below the one and above the others)."""
    budget = 200
    config = cloud_config(proxy.base_url, timeout_s=300.0, daily_cap_usd=10.0)
    config["cloud"]["models"][0].update(usd_per_mtok_in=PRICE_IN, usd_per_mtok_out=0.0)
    config["attachments"] = {"doc_token_budget": budget, "doc_chunk_chars": 120}
    handle = daemon_factory(config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    proxy.set(NO_USAGE)
    line = "第{0}项：项目计划的预算、招聘和差旅安排由第{0}小组负责，截止日期是{1}月底。"
    paragraphs = [line.format(i, i % 12 + 1) for i in range(80)]
    doc = tmp_path / "计划.txt"
    doc.write_text("\n\n".join(paragraphs), encoding="utf-8")
    result = handle.client().ask(CHINESE_QUESTION, attachments=[attachment(doc)], max_tokens=4)
    assert result.decision.location == "cloud", result.decision.reason
    [seen] = proxy.chat_requests()
    sent = seen.body["messages"][-1]["content"]
    assert isinstance(sent, str) and sent.endswith(CHINESE_QUESTION)
    excerpt = sent[: -len(CHINESE_QUESTION)].split("\n", 1)[1].rstrip("\n")  # after the "Document ... excerpts:" line
    assert 0 < tokens(vocab, excerpt) <= 1.25 * budget, tokens(vocab, excerpt)
    [row] = handle.rows()
    assert row["cost_estimated"] == 1
    assert row["tokens_in"] >= 0.75 * tokens(vocab, sent), (row["tokens_in"], tokens(vocab, sent))
    assert row["cost_usd"] == pytest.approx(row["tokens_in"] * PRICE_IN / 1e6)
