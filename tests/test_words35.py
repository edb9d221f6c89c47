"""The router learns from prompts in any script: words of Chinese, Japanese and Thai are their letters.

Split at whitespace alone, a Chinese prompt was one word, its hashed n-grams unique to it: labels for Chinese
arithmetic the local model got wrong moved the next Chinese sum's s_hat no more than any other prompt's.
Text with spaces hashes as before (the shipped prior and the replay figures are fitted on it). A turn
estimates its question's tokens once, for every context check and cloud price.
"""

from __future__ import annotations

import json
import random
import zlib
from typing import Any

import pytest

from locod.daemon.cloud_usage import estimated_input
from locod.daemon.config import CloudConfig, CloudModelConfig, Config
from locod.daemon.prompts import cloud_text
from locod.daemon.sessions import Session
from locod.daemon.textwords import split_letters
from locod.daemon.turn import Turn
from locod.errors import PromptTooLong
from locod.policy.messplus import HASH_DIM, MessPlus, RecordedFeatures, TurnFeatures, hashed_record, vectorize
from locod.policy.rule import estimate_tokens
from locod.policy.tasks import task_of
from locod.protocol import Attachment, ChatRequest

LOCAL = "smollm2-135m-instruct"
# Sums the local model gets wrong, worded three ways, and a fourth wording the labels never saw; beside them
# chat questions a user calls good. All are questions (task "query"): only the words tell them apart.
ZH_SUMS = ("{a}加{b}等于多少？", "{a}加上{b}是多少？", "{a}和{b}加起来是几？")
ZH_NEW_SUM = "把431与254相加，结果是几？"
ZH_CHATS = ("你喜欢{x}吗？", "{x}美不美？", "你觉得{x}怎么样？")
ZH_NEW_CHAT = "春天让你想到什么？"
ZH_THINGS = ("春天", "大海", "猫", "月亮", "山", "花")

# Hashes taken before words were split at Chinese, Japanese and Thai letters: text without them hashes the same.
ENGLISH_HASHES = {
    "What is 66 times 93? Answer with the number only.": {
        i: 0.22942
        for i in (610, 663, 1555, 3724, 3840, 2597, 526, 3558, 3924, 2693, 850, 3935, 2396, 3352, 3672, 1744, 1607)
        + (1948, 1625)
    },
    "Complete with a short answer: East, West, North，and South are four": {  # a full-width comma among spaces
        i: 0.21822
        for i in (35, 526, 3651, 162, 3890, 2398, 2795, 554, 1396, 1702, 1661, 2404, 473, 2726, 2982, 819, 3978)
        + (1455, 2909, 1524, 1730)
    },
    "Сколько будет   2 плюс 2?\nОтвет:": {
        i: 0.30151 for i in (357, 1223, 3597, 3208, 2995, 2486, 2295, 2281, 2865, 1897, 614)
    },
}


def test_text_with_spaces_hashes_as_before() -> None:
    for prompt, hashed in ENGLISH_HASHES.items():
        assert hashed_record(prompt) == hashed, prompt
        assert split_letters(prompt.lower()) == prompt.lower().split()


def test_a_chinese_prompt_is_hashed_by_its_letters() -> None:
    """Before: one word, "把431与254相加，结果是几？", its one unigram shared with no other prompt."""
    assert split_letters(ZH_NEW_SUM) == ["把", "431", "与", "254", "相", "加", "，", "结", "果", "是", "几", "？"]
    assert split_letters("タイ語 ภาษาไทย ok") == ["タ", "イ", "語", "ภ", "า", "ษ", "า", "ไ", "ท", "ย", "ok"]
    shared = hashed_record(ZH_NEW_SUM).keys() & hashed_record("431加254等于多少？").keys()
    assert shared == {_index(gram) for gram in ("431", "254", "加", "？")}  # before: none


def test_labels_on_chinese_sums_carry_over_to_a_new_wording() -> None:
    """MESS+'s own head, labels as the daemon gives them: sums labelled wrong, chat questions good. The new
    sum's s_hat falls below the new chat question's as an English one's does; on the old split they stayed
    level (gap 0.001 after 6 labels each, English 0.06)."""
    gaps = {}
    for lang, sums, chats, new_sum, new_chat, things in (
        ("zh", ZH_SUMS, ZH_CHATS, ZH_NEW_SUM, ZH_NEW_CHAT, ZH_THINGS),
        (
            "en",
            ("What is {a} plus {b}?", "How much is {a} plus {b}?", "What do {a} and {b} add up to?"),
            ("Do you like {x}?", "Is {x} beautiful?", "What do you think of {x}?"),
            "What would 431 plus 254 be?",
            "What does spring remind you of?",
            ("spring", "the sea", "cats", "the moon", "mountains", "flowers"),
        ),
    ):
        mess = MessPlus({LOCAL: 0.5}, sla=0.8, v=1.0, explore_c=0.0, q_cap=10.0)
        rng = random.Random(7)
        for i in range(6):
            wrong = sums[i % 3].format(a=rng.randint(100, 999), b=rng.randint(100, 999))
            good = chats[i % 3].format(x=things[i])
            mess.train(LOCAL, vectorize(TurnFeatures(wrong, task_of(wrong))), 0.0)
            mess.train(LOCAL, vectorize(TurnFeatures(good, task_of(good))), 1.0)
        assert task_of(new_sum) == task_of(new_chat) == "query"
        s_sum, s_chat = (mess.satisfaction(vectorize(TurnFeatures(p, "query")), LOCAL) for p in (new_sum, new_chat))
        gaps[lang] = s_chat - s_sum
    assert gaps["zh"] > 0.05 and gaps["en"] > 0.05, gaps


def test_an_old_record_of_a_chinese_prompt_trains_on_its_own_hashes() -> None:
    """A decision recorded before the split keeps the whole sentence's one hash: its label still loads and
    trains exactly what was decided on (that n-gram), not the prompt's letters, which the record lacks."""
    sentence = "431加254等于多少？"
    old = {str(_index(sentence.lower())): 1.0}
    recorded = RecordedFeatures.from_json({"task": "query", "prompt_chars": len(sentence), "hashed": old})
    assert recorded is not None and recorded.hashed == {_index(sentence): 1.0}
    mess = MessPlus({LOCAL: 0.5}, sla=0.8, v=1.0, explore_c=0.0, q_cap=10.0)
    before = mess.state.weights[LOCAL].copy()
    mess.train(LOCAL, recorded.vector(), 0.0)
    moved = {int(i) for i in (mess.state.weights[LOCAL] != before).nonzero()[0] if i < HASH_DIM}
    assert moved == {_index(sentence)}
    assert _index(sentence) not in hashed_record(sentence)  # a new record of it holds the letters instead


def _index(gram: str) -> int:
    return zlib.crc32(gram.encode()) % HASH_DIM


def test_a_turn_prices_its_question_as_its_whole_text_estimates() -> None:
    """The question's estimate is read from the turn (once): the price is the one the whole text gives."""
    prompt = ("Summarise this, 42 times: 中文 and English. " * 500).strip()
    session = Session("s", owner="ipc")
    session.dialogue = (({"role": "user", "content": "earlier: 你好"},), (False,))
    turn = Turn(ChatRequest("r", [{"role": "user", "content": prompt}]), session, b"c", "chat", [], Config())
    assert turn.prompt_tokens == estimate_tokens(prompt)
    model = CloudModelConfig(name="m", base_url="http://127.0.0.1:9/v1", model="m", usd_per_mtok_in=1.0)
    config = Config(cloud=CloudConfig(models=[model]))
    whole = estimated_input(cloud_text(turn, (), config.attachments.doc_token_budget))
    assert turn.cloud_price(config, "m", (), 10) == model.price(whole, 10, 0)
    handed = Turn(turn.request, session, b"c", "chat", [], Config(), prompt_estimate=7)
    assert handed.prompt_tokens == 7  # as TurnRunner hands it over after refusing an unfit prompt


def test_an_unfit_prompt_is_refused_before_its_attachment_is_read(daemon_factory: Any) -> None:
    """The estimate the refusal is made on is the one the turn carries on: still made before any attachment
    is read (a missing file would say so instead), and said in the same numbers."""
    handle = daemon_factory()
    missing = Attachment("document", "notes.md", path="/nonexistent/words35/notes.md")
    with pytest.raises(PromptTooLong) as refused:
        handle.client().ask("word " * 5000, attachments=[missing], max_tokens=2)
    assert f"the prompt needs about {estimate_tokens('word ' * 5000)} tokens" in refused.value.message
    assert handle.rows() == []


def test_chinese_labels_move_the_next_chinese_turns_s_hat(daemon_factory: Any) -> None:
    """The daemon, its embedded model answering: Chinese sums graded by their answers and chat questions called
    good, each labelled with `locod feedback`; then a sum and a chat question worded as none before. Their
    recorded s_hat drift apart (on the old split they moved together, by the bias alone)."""
    handle = daemon_factory({"routing": {"explore_c": 0.0}})
    client = handle.client()

    def s_hat(prompt: str) -> float:
        decision = client.ask(prompt, max_tokens=4).done.decision
        (row,) = handle.rows("SELECT s_hat FROM decisions WHERE id = ?", (decision,))
        return float(json.loads(row["s_hat"])[LOCAL])

    def label(decision: int, good: bool) -> None:
        said = handle.cli("feedback", str(decision), "good" if good else "bad")
        assert said.returncode == 0, said.stderr

    gap_before = s_hat(ZH_NEW_CHAT) - s_hat(ZH_NEW_SUM)
    rng = random.Random(7)
    wrong = 0
    for i in range(6):
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        result = client.ask(ZH_SUMS[i % 3].format(a=a, b=b), max_tokens=16)
        right = str(a + b) in result.text.replace(",", "")
        wrong += not right
        label(result.done.decision, right)
        label(client.ask(ZH_CHATS[i % 3].format(x=ZH_THINGS[i]), max_tokens=4).done.decision, True)
    assert wrong >= 5  # the embedded model cannot add three-digit numbers
    gap_after = s_hat(ZH_NEW_CHAT) - s_hat(ZH_NEW_SUM)
    assert gap_after - gap_before > 0.03, (gap_before, gap_after)


@pytest.mark.parametrize("text", ["", "   ", "a\u3000b", "ＡＢＣ１２", "x\u200by"])
def test_split_letters_is_str_split_without_unspaced_letters(text: str) -> None:
    assert split_letters(text) == text.split()
