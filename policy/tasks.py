"""A turn's task category: one definition for the daemon, the predictor, the policy's observation and the
replay scripts (the order of ``TASKS`` is part of the observation layout and of MESS+'s features).

A prompt gets the category its English translation gets: each rule knows the words of its English rule in
German, French, Spanish, Russian, Arabic, Chinese and Japanese (docs/routing.md). With English words alone,
"Übersetze das ins Englische" was chat and "把这句话翻译成英文" too, and for such a prompt the category is
most of what a fresh install's prior knows: none of its words were in the trace the prior was fitted on.

This runs on the per-turn path, so it is plain regular-expression work measured in microseconds, over at most
the first and last EDGE_CHARS characters of a prompt (its instruction is there; between them is pasted text).
"""

from __future__ import annotations

import re

EDGE_CHARS = 2_000  # a longer prompt is read at its start and its end only (the traces' longest is 3,773)
# A letter or digit of a script written with spaces: a word of such a script ends where the next character
# is none (Chinese and Japanese run words together, so "用Python写" holds the word "Python").
_RUN_TOGETHER = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f"  # kana and Han
_LETTER = rf"[^\W{_RUN_TOGETHER}]"


def _words(*words: str) -> str:
    """An alternation of words (regular expressions, lower case) that match whole, in any script."""
    return rf"(?<!{_LETTER})(?:{'|'.join(words)})(?!{_LETTER})"


def _run_together(*words: str) -> str:
    """An alternation of Chinese and Japanese words, found anywhere; tried only where such a letter is, as
    each of its words would be tried at every position of the text otherwise."""
    return rf"(?=[{_RUN_TOGETHER}])(?:{'|'.join(words)})"


def _rule(*patterns: str) -> re.Pattern[str]:
    """A category's rule, over lower-cased text: a few alternations, since each part is tried at every
    position of the text (a category's words are one ``_words`` part, not one a language)."""
    return re.compile("|".join(patterns))


# The first rule that matches names the task; TMO's categories plus the ones a laptop assistant sees most.
# Each rule knows its English words and the same words in German, French, Spanish, Russian and Arabic, then
# in Chinese and Japanese.
TASK_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "code",
        _rule(
            _words(
                *("def", "class", "function", "python", "javascript", "rust", "bug", "compile", "stack trace"),
                *("regex", "sql", r"funktion\w*", r"fonction\w*", r"funci[oó]n\w*", r"функци\w*", r"(?:ال)?دال[ةّ]"),
                *("klasse", "classe", "clase", r"класс\w*", r"kompilier\w*", r"compil(?:er|ar|a|ez)", "баг"),
                *(r"компил\w*", "питон", "пайтон", "بايثون", "جافا ?سكريبت", r"регулярн\w* выражени\w*"),
            ),
            _run_together("函数", "関数", "编译", "コンパイル", "クラス", "バグ", "パイソン", "正则", "正規表現"),
            "```",
        ),
    ),
    (
        "math",
        _rule(
            _words(
                *("sum", "product", "solve", "equation", "integral", "percent", "how many", "calculate"),
                *("summe", "somme", "la suma", r"suma (?:de|\d)", r"сумм\w*", "(?:ال)?مجموع", "produkt", "produit"),
                *("producto", r"произведени\w*", "حاصل ضرب", "löse", "lösen", "résous", "résoudre", "résolvez"),
                *(r"resuelv\w*", "resolver", "реши", "решить", "решите", "حل", "gleichung", r"[ée]quation"),
                *(r"ecuaci[oó]n", r"уравнени\w*", "(?:ال)?معادلة", "intégrale", r"интеграл\w*", "(?:ال)?تكامل"),
                *("prozent", r"pour ?cent\w*", r"por ?ciento", "porcentaje", r"процент\w*", r"(?:ب|في )ال?مئة"),
                *("نسبة مئوية", "wie viele?", "combien", r"cu[aá]nt[oa]s?", "сколько", "كم(?! الساعة)"),
                *(r"(?:be|aus)?rechne\w*", r"calcul(?:a|e|er|ez|ar)", r"вычисл\w*", r"посчита\w*", r"подсчита\w*"),
                *(r"рассчита\w*", "احسب"),
            ),
            _run_together(
                *("总和", "之和", "求和", "乘积", "之积", "求解", "解方程", "方程", "积分", "百分之", "百分比", "多少"),
                *("几个", "计算", "計算", "積分", "合計", "パーセント", "いくつ", "何個", "何人", "何本", "何匹"),
                *("何回", "解いて"),
            ),
            r"\d\s*[-+*/^=×÷−＋－＊／＝]\s*\d",
        ),
    ),
    (
        "rewrite",
        _rule(
            _words(
                *("rewrite", "rephrase", "paraphrase", "translate", r"summari[sz]e", "shorten", "proofread", "edit"),
                *(r"umschreib\w*", r"umformulier\w*", "formuliere", r"paraphrasier\w*", r"übersetz\w*"),
                *(r"zusammenfass\w*", "fasse", r"kürze\w*", r"korrigier\w*", r"korrekturles\w*", r"bearbeite\w*"),
                *(r"r[ée][ée]cri\w*", r"reformul(?:e[rz]?|ar?)", r"paraphrase[rz]", r"tradui\w*", r"traduc\w*"),
                *(r"résum(?:e[rz]?)", "resumir", "resumen", r"resume (?:est[eao]s?|el|la|los|las|lo|mi|en)"),
                *(r"resúm\w*", "relis", "relire", r"raccourci\w*", r"corrig\w*", r"reescrib\w*", r"parafrase\w*"),
                *(r"acort\w*", r"перепиш\w*", r"перефразир\w*"),
                *(r"перевед\w*", r"перевод\w*", r"перевест\w*", r"перескаж\w*", r"резюмир\w*", r"сократи\w*"),
                *(r"отредактир\w*", r"(?:ال)?ترجم\w*", r"لخ[صّ]\w*", "(?:ال)?ملخص", "(?:ال)?تلخيص", "أعد صياغة"),
                *("اعد صياغة", "أعد كتابة", "اعد كتابة", r"اختصر\w*", "صحح", "دقق"),
            ),
            _run_together(
                *("改写", "重写", "改述", "翻译", "译成", "译为", "总结", "概括", "摘要", "归纳", "缩短", "精简"),
                *("校对", "润色", "编辑", "修改", "書き直", "書き換え", "言い換え", "翻訳", "訳して", "英訳", "和訳"),
                *("要約", "まとめて", "短くして", "校正", "添削", "編集"),
            ),
        ),
    ),
    (
        "recommend",
        _rule(
            _words(
                *("recommend", "suggest", "which should", "best way", "ideas? for"),
                *(r"empfiehl\w*", r"empfehl\w*", r"vorschl[aä]g\w*", "ideen für", r"beste[nr]? (?:weg|möglichkeit)"),
                *(r"recommand\w*", r"sugg[eè]re[rz]?", "suggérer", r"idées? (?:de|pour)", r"meilleure? fa[cç]on"),
                *("meilleur moyen", r"recomi[eé]nd\w*", r"recomend\w*", r"sugier\w*", r"suger\w*", "ideas? para"),
                *("mejor (?:manera|forma|modo)", r"посовет\w*", r"порекоменд\w*", r"рекоменд\w*", "идеи для"),
                *("лучший способ", r"اقترح\w*", "أقترح", r"[اأ]نصح\w*", r"تنصح\w*", "نصيحة", r"توصي\w*"),
                *("أفكار", "أفضل طريقة"),
            ),
            _run_together(
                *("推荐", "建议", "主意", "点子", "最好的方法", "最好的办法", "最佳方法", "最佳办法", "おすすめ"),
                *("お勧め", "お薦め", "オススメ", "勧めて", "推薦", "提案", "アイデア", "アイディア", "一番いい方法"),
                "最善の方法",
            ),
        ),
    ),
    # a question: one that begins with a question word (Spanish: with ¿; Russian: with ли after its first
    # word), or ends in ?, in Chinese and Japanese its full-width ？, in Arabic and Persian ؟
    (
        "query",
        _rule(
            _run_together(
                *("什么", "谁", "哪", "为什么", "怎么", "怎样", "如何", "是否", "是不是", "几点"),
                r"[吗呢][。.！!\s]*$",
                *("何(?!か)", "誰", "いつ(?!も)", "どこ", "どれ", "どの", "なぜ", "どうして", "どうやって", "どのよう"),
                r"か[。.\s]*$",
            ),
            r"[?\uff1f\u061f]\s*$",
            r"^\s*(?:¿|"
            + _words(
                *("who", "what", "when", "where", "which", "why", "how", "is", "are", "does", "did", "can"),
                *("wer", "was", "wann", "wo", "woher", "wohin", "warum", "wieso", "weshalb", "wie"),
                *(r"welche[rsmn]?", "ist", "sind", "kannst", "kann", r"könn\w*", "gibt es", "hast"),
                *("qui", "que", r"qu['’]\w*", "quoi", "quand", "où", r"quel(?:le)?s?", "pourquoi"),
                *("est-ce", "peux-tu", "pouvez-vous", "puis-je", "y a-t-il", r"qui[eé]n\w*", "qué"),
                *("cuándo", "dónde", "donde", r"cu[aá]l\w*", r"por qu[eé]", "cómo", "puedes", "podrías"),
                *("кто", "что", "когда", "где", "куда", "откуда", "почему", "зачем", "как"),
                *(r"как(?:ой|ая|ое|ие|ов)", "чей", "можешь", "можете", r"\w+ ли"),
                *("هل", "ما", "ماذا", "متى", "أين", "لماذا", "كيف", "أي", r"من(?!\s+فضلك)"),
            )
            + ")",
        ),
    ),
)
TASKS = ("chat", *(name for name, _ in TASK_RULES))


def task_of(prompt: str) -> str:
    text = prompt if len(prompt) <= 2 * EDGE_CHARS else prompt[:EDGE_CHARS] + "\n" + prompt[-EDGE_CHARS:]
    text = text.lower()
    for name, pattern in TASK_RULES:
        if pattern.search(text):
            return name
    return "chat"
