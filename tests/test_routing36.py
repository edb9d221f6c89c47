"""A prompt's task category does not depend on the language it is written in.

The rules knew English words only: "Übersetze das ins Englische" and "把这句话翻译成英文" were chat, a Russian
sum chat, a Japanese question without its ？ chat. For a prompt none of whose words the shipped prior was
fitted on, the category is most of what a fresh install's predictor knows of it, and a label on such a turn
trained another category's weight than the English prompt it translates. Now each rule knows its words in
German, French, Spanish, Russian, Arabic, Chinese and Japanese; English prompts, the traces' included, keep
their categories (so the replay figures in docs/routing.md stand), and a long paste is read at its edges.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import pytest

from locod.policy.tasks import EDGE_CHARS, TASKS, task_of
from tests.conftest import cloud_config
from tests.faultproxy import FaultProxy

DATA = Path(__file__).resolve().parent.parent / "policy" / "data"

# An English prompt, then the same in German, French, Spanish, Russian, Arabic, Chinese and Japanese.
PARALLEL = (
    (
        "Translate this sentence into English: good morning",
        "Übersetze diesen Satz ins Englische: guten Morgen",
        "Traduis cette phrase en anglais : bonjour",
        "Traduce esta frase al inglés: buenos días",
        "Переведи это предложение на английский: доброе утро",
        "ترجم هذه الجملة إلى الإنجليزية: صباح الخير",
        "把这句话翻译成英文：早上好",
        "この文を英語に翻訳してください：おはよう",
    ),
    (
        "Summarize this article in three sentences",
        "Fasse diesen Artikel in drei Sätzen zusammen",
        "Résume cet article en trois phrases",
        "Resume este artículo en tres frases",
        "Перескажи эту статью в трёх предложениях",
        "لخص هذا المقال في ثلاث جمل",
        "用三句话总结这篇文章",
        "この記事を三文で要約してください",
    ),
    (
        "Summarise the attached document",
        "Fasse das angehängte Dokument zusammen",
        "Résume le document joint",
        "Resume el documento adjunto",
        "Кратко перескажи приложенный документ",
        "لخص المستند المرفق",
        "总结一下附件里的文档",
        "添付の文書を要約して",
    ),
    (
        "Rephrase this more politely: give me the money",
        "Formuliere das höflicher: Gib mir das Geld",
        "Reformule ceci plus poliment : donne-moi l'argent",
        "Reformula esto de forma más educada: dame el dinero",
        "Перефразируй это вежливее: дай мне деньги",
        "أعد صياغة هذا بأدب أكثر: أعطني المال",
        "把这句话改写得更礼貌一些：把钱给我",
        "もっと丁寧に言い換えてください：金をくれ",
    ),
    (
        "What is the capital of Canada",
        "Was ist die Hauptstadt von Kanada",
        "Quelle est la capitale du Canada",
        "Cuál es la capital de Canadá",
        "Какая столица у Канады",
        "ما هي عاصمة كندا",
        "加拿大的首都是哪里",
        "カナダの首都はどこですか",
    ),
    (
        "Why is the sky blue",
        "Warum ist der Himmel blau",
        "Pourquoi le ciel est-il bleu",
        "Por qué el cielo es azul",
        "Почему небо голубое",
        "لماذا السماء زرقاء",
        "为什么天空是蓝色的",
        "なぜ空は青いのですか",
    ),
    (
        "Who wrote Hamlet",
        "Wer hat Hamlet geschrieben",
        "Qui a écrit Hamlet",
        "Quién escribió Hamlet",
        "Кто написал Гамлета",
        "من كتب هاملت",
        "谁写了哈姆雷特",
        "ハムレットを書いたのは誰ですか",
    ),
    (
        "What time is it?",
        "Wie spät ist es?",
        "Quelle heure est-il ?",
        "¿Qué hora es?",
        "Который час?",
        "كم الساعة الآن؟",
        "现在几点了？",
        "今何時ですか？",
    ),
    (
        "How many legs does a spider have",
        "Wie viele Beine hat eine Spinne",
        "Combien de pattes a une araignée",
        "Cuántas patas tiene una araña",
        "Сколько ног у паука",
        "كم عدد أرجل العنكبوت",
        "蜘蛛有几个腿",
        "クモの脚は何本ありますか",
    ),
    (
        "Calculate 15 percent of 80",
        "Berechne 15 Prozent von 80",
        "Calcule 15 pour cent de 80",
        "Calcula el 15 por ciento de 80",
        "Вычисли 15 процентов от 80",
        "احسب 15 بالمئة من 80",
        "计算80的百分之十五",
        "80の15パーセントを計算してください",
    ),
    (
        "Solve the equation x squared equals nine",
        "Löse die Gleichung x Quadrat gleich neun",
        "Résous l'équation x au carré égale neuf",
        "Resuelve la ecuación x al cuadrado igual a nueve",
        "Реши уравнение икс в квадрате равно девяти",
        "حل المعادلة س تربيع يساوي تسعة",
        "解方程x的平方等于九",
        "xの二乗が9になる方程式を解いてください",
    ),
    (
        "What is the sum of forty-five and sixty-seven",
        "Was ist die Summe von fünfundvierzig und siebenundsechzig",
        "Quelle est la somme de quarante-cinq et soixante-sept",
        "Cuál es la suma de cuarenta y cinco y sesenta y siete",
        "Какова сумма сорока пяти и шестидесяти семи",
        "ما مجموع خمسة وأربعين وسبعة وستين",
        "四十五和六十七的总和是什么",
        "四十五と六十七の合計は",
    ),
    (
        "Write a Python function that sorts a list",
        "Schreibe eine Python-Funktion, die eine Liste sortiert",
        "Écris une fonction Python qui trie une liste",
        "Escribe una función en Python que ordene una lista",
        "Напиши функцию на Python, которая сортирует список",
        "اكتب دالة بايثون لترتيب قائمة",
        "用Python写一个排序列表的函数",
        "リストを並べ替えるPythonの関数を書いて",
    ),
    (
        "My SQL query is too slow",
        "Meine SQL-Abfrage ist zu langsam",
        "Ma requête SQL est trop lente",
        "Mi consulta SQL es demasiado lenta",
        "Мой SQL-запрос слишком медленный",
        "استعلام SQL الخاص بي بطيء جدا",
        "我的SQL查询太慢了",
        "SQLクエリが遅すぎる",
    ),
    (
        "Recommend a good science fiction book",
        "Empfiehl mir ein gutes Science-Fiction-Buch",
        "Recommande-moi un bon livre de science-fiction",
        "Recomiéndame un buen libro de ciencia ficción",
        "Посоветуй хорошую научно-фантастическую книгу",
        "اقترح علي كتاب خيال علمي جيد",
        "推荐一本好看的科幻小说",
        "おすすめのSF小説を教えて",
    ),
    (
        "Give me ideas for a birthday party",
        "Gib mir Ideen für eine Geburtstagsfeier",
        "Donne-moi des idées pour une fête d'anniversaire",
        "Dame ideas para una fiesta de cumpleaños",
        "Дай идеи для дня рождения",
        "أعطني أفكار لحفلة عيد ميلاد",
        "给我一些生日派对的点子",
        "誕生日パーティーのアイデアをください",
    ),
    (
        "Write a poem about the sea",
        "Schreib ein Gedicht über das Meer",
        "Écris un poème sur la mer",
        "Escribe un poema sobre el mar",
        "Напиши стихотворение о море",
        "اكتب قصيدة عن البحر",
        "写一首关于大海的诗",
        "海についての詩を書いて",
    ),
    (
        "Tell me a story about a dragon",
        "Erzähl mir eine Geschichte über einen Drachen",
        "Raconte-moi une histoire de dragon",
        "Cuéntame una historia sobre un dragón",
        "Расскажи мне сказку о драконе",
        "احك لي قصة عن تنين",
        "给我讲一个关于龙的故事",
        "ドラゴンの物語を聞かせて",
    ),
    (
        "Hello, nice to meet you",
        "Hallo, freut mich dich kennenzulernen",
        "Bonjour, ravi de te rencontrer",
        "Hola, encantado de conocerte",
        "Привет, рад познакомиться",
        "مرحبا، سعيد بلقائك",
        "你好，很高兴认识你",
        "こんにちは、はじめまして",
    ),
)
LANGUAGES = ("de", "fr", "es", "ru", "ar", "zh", "ja")

# Each trace's (task, category) counts, as the replay figures and the shipped prior were made on them.
TRACE_CATEGORIES = {
    "bigbench_trace.jsonl": {
        ("wikidata", "chat"): 500,
        ("mul_2digit", "query"): 250,
        ("negation", "rewrite"): 300,
        ("past_tense", "query"): 298,
        ("past_tense", "math"): 1,
        ("past_tense", "recommend"): 1,
        ("add_1digit", "query"): 100,
        ("plural", "query"): 300,
        ("add_2digit", "query"): 250,
    },
    "bigbench_unseen_trace.jsonl": {
        ("add_3digit", "query"): 200,
        ("qasc", "chat"): 198,
        ("qasc", "code"): 1,
        ("qasc", "math"): 1,
        ("unscramble", "chat"): 200,
        ("sub_1digit", "query"): 100,
        ("categories", "chat"): 198,
        ("categories", "math"): 1,
        ("categories", "code"): 1,
        ("counting", "math"): 200,
        ("elements", "query"): 200,
    },
    "bigbench_third_trace.jsonl": {
        ("disfl_qa", "query"): 97,
        ("disfl_qa", "code"): 9,
        ("disfl_qa", "chat"): 29,
        ("disfl_qa", "math"): 21,
        ("disfl_qa", "rewrite"): 3,
        ("disfl_qa", "recommend"): 1,
        ("context_qa", "query"): 157,
        ("context_qa", "math"): 1,
        ("context_qa", "code"): 2,
        ("units", "math"): 80,
        ("units", "chat"): 48,
        ("units", "query"): 32,
        ("color", "query"): 160,
        ("operators", "chat"): 125,
        ("operators", "math"): 35,
        ("tense", "chat"): 159,
        ("tense", "code"): 1,
    },
}


def test_the_set_covers_every_category() -> None:
    assert {task_of(english) for english, *_ in PARALLEL} == set(TASKS)


@pytest.mark.parametrize("row", PARALLEL, ids=[english for english, *_ in PARALLEL])
def test_a_translation_gets_the_english_prompts_category(row: tuple[str, ...]) -> None:
    english, *translations = row
    got = {language: task_of(prompt) for language, prompt in zip(LANGUAGES, translations)}
    assert got == dict.fromkeys(LANGUAGES, task_of(english)), english


@pytest.mark.parametrize("trace", sorted(TRACE_CATEGORIES))
def test_the_traces_keep_their_categories(trace: str) -> None:
    """The shipped prior was fitted on these categories and the replay figures were measured on them: no
    word of another language may move an English prompt (their "resources", "suggestion", "resumed", a
    person named Suma)."""
    rows = [json.loads(line) for line in (DATA / trace).read_text().splitlines()]
    counts = collections.Counter((row["task"], task_of(row["prompt"])) for row in rows)
    assert dict(counts) == TRACE_CATEGORIES[trace]


def test_english_words_that_look_like_anothers_keep_their_category() -> None:
    """The words of other languages are their own forms, not stems English shares ("compil", "calcul",
    "résum", "paraphras", "quel"): English prompts outside the traces keep their category too. One start
    is shared on purpose: German "Was" (what) begins a question, as an English one beginning with "Was" is."""
    for prompt in (
        "Comment on this poem",
        "Make a compilation of 80s songs",
        "Improve my résumé",
        "The calculation took hours",
        "I keep paraphrasing myself",
        "Quell my fears",
        "Resume the download",
        "Suma is my friend's name",
        "We need more resources",
        "The committee rejected the suggestion",
    ):
        assert task_of(prompt) == "chat", prompt
    assert task_of("Was it worth it") == task_of("Is it worth it") == "query"


def test_a_question_mark_or_question_word_of_each_script() -> None:
    """Unlike English, a Spanish question begins with ¿, a Russian one may ask with ли, a Chinese one ends
    in 吗 and a Japanese one in か, each with no question mark after."""
    for prompt in ("¿Tienes tiempo mañana", "Есть ли жизнь на Марсе", "你是机器人吗", "明日は雨が降りますか"):
        assert task_of(prompt) == "query", prompt
    for prompt in ("Please write a story", "من فضلك اكتب قصة", "Bitte schreib eine Geschichte", "いつも元気です"):
        assert task_of(prompt) == "chat", prompt


def test_arithmetic_signs_of_other_keyboards_are_arithmetic() -> None:
    for prompt in ("12 × 7", "12 ÷ 4", "３＋５", "10 − 3"):
        assert task_of(prompt) == "math", prompt


def test_a_long_paste_is_read_at_its_edges() -> None:
    """What the user asks is at the start or the end of a prompt; a paste between them, however long, is
    read no further than EDGE_CHARS from either end (its words said "code" for a paste that mentions a class,
    and reading all of it took about 0.3 us a character, a megabyte per turn allowed)."""
    paste = "The committee met on Tuesday. " * 200 + "Its class of 2019 came. " + "Lunch was late. " * 200
    assert len(paste) > 4 * EDGE_CHARS
    assert task_of(paste) == "chat"
    assert task_of("Summarise this:\n" + paste) == "rewrite"
    assert task_of(paste + "\nÜbersetze das ins Englische.") == "rewrite"
    assert task_of(paste + "\nWhat did the committee decide?") == "query"


def test_the_daemons_record_carries_the_category_it_was_decided_on(daemon_factory: Any, proxy: FaultProxy) -> None:
    """Through the daemon, its embedded model on offer beside the loopback cloud: each turn's record names the
    category of its prompt in any language, its features (what a later label trains) carry the same, and
    `locod decisions ID` says it."""
    config = cloud_config(proxy.base_url, mode="auto", timeout_s=30.0)
    config["routing"]["explore_c"] = 0.0
    handle = daemon_factory(config, extra_env={"LOCOD_CLOUD_API_KEY": "sk-routing36"})
    client = handle.client()
    prompts = {
        "Übersetze diesen Satz ins Englische: guten Morgen": "rewrite",
        "十二乘以八等于多少": "math",
        "Напиши функцию на Python, которая сортирует список": "code",
        "ハムレットを書いたのは誰ですか": "query",
    }
    for prompt, category in prompts.items():
        decision = client.ask(prompt, max_tokens=2).done.decision
        (row,) = handle.rows("SELECT task, features, s_hat FROM decisions WHERE id = ?", (decision,))
        assert row["task"] == category, prompt
        assert json.loads(row["s_hat"]), prompt  # routed by MESS+, not forced
        assert json.loads(row["features"])["task"] == category, prompt
        explained = handle.cli("decisions", str(decision))
        assert explained.returncode == 0, explained.stderr
        assert f", {category} turn 0 of session" in explained.stdout.splitlines()[0]
