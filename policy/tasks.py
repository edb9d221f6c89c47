"""A turn's task category: one definition for the daemon, the predictor, the policy's observation and the
replay scripts (the order of ``TASKS`` is part of the observation layout and of MESS+'s features).

A prompt gets the category its English translation gets: each rule knows the words of its English rule in
the languages of ``LANGUAGES`` (docs/routing.md). With English words alone, "Übersetze das ins Englische"
was chat and "把这句话翻译成英文" too, and for such a prompt the category is most of what a fresh install's
prior knows: none of its words were in the trace the prior was fitted on.

This runs on the per-turn path, so it is plain regular-expression work measured in microseconds, over at most
the first and last EDGE_CHARS characters of a prompt (its instruction is there; between them is pasted text).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

EDGE_CHARS = 2_000  # a longer prompt is read at its start and its end only (the traces' longest is 3,773)
# A letter of a script written with spaces: a word of such a script ends where the next character is none
# (Chinese and Japanese run words together, so "用Python写" holds the word "Python"). Combining marks are
# part of a word: Devanagari writes most vowels with them ("क्या" is four characters, two of them marks).
RUN_TOGETHER = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f"  # kana and Han
_MARKS = "\u0300-\u036f\u064b-\u065f\u0670\u0900-\u0963\u0966-\u097f"  # Latin, Arabic, Devanagari (not ।)
_LETTER = rf"(?:[^\W{RUN_TOGETHER}]|[{_MARKS}])"
# English, German, French, Spanish, Portuguese, Russian, Polish, Arabic, Hindi, Korean, Indonesian, Turkish,
# Vietnamese, Chinese, Japanese
LANGUAGES = ("en", "de", "fr", "es", "pt", "ru", "pl", "ar", "hi", "ko", "id", "tr", "vi", "zh", "ja")
RUN_TOGETHER_LANGUAGES = ("zh", "ja")  # their words are found anywhere, the others' as whole words

# Each table: a language's words (regular expressions, lower case) for one rule. A word ending in \w* takes
# the endings of an inflecting language (Russian, Polish, Turkish, Korean's particles); Hindi's are marks,
# which \w does not match, so its forms are written out.
CODE: Mapping[str, tuple[str, ...]] = {
    "en": ("def", "class", "function", "python", "javascript", "rust", "bug", "compile", "stack trace", "regex", "sql"),
    "de": (r"funktion(?:en)?", "klasse", r"kompilier\w*"),
    "fr": (r"fonctions?", "classe", "compiler", "compilez"),
    "es": (r"funci[oó]n(?:es)?", "clase", "compilar", "compila"),
    "pt": (r"funç(?:ão|ões)", "classe", "compilar", "compila"),
    "ru": (r"функци\w*", r"класс\w*", r"компил\w*", "баг", "питон", "пайтон", r"регулярн\w* выражени\w*"),
    "pl": (r"funkcj(?:a|ę|i|e|ą|ach|ami)", r"klas(?:a|ę|ie|y)", r"kompil\w*", r"skompiluj\w*", r"pythoni?e"),
    "ar": (r"(?:ال)?دالّ?ة", "بايثون", "جافا ?سكريبت"),
    "hi": ("फ़ंक्शन", "फंक्शन", "पायथन", "क्लास", "कंपाइल"),
    "ko": (
        *(r"함수\w*", r"클래스\w*", r"파이썬\w*", r"컴파일\w*", r"버그\w*"),
        *(r"정규 ?(?:표현)?식\w*", r"자바스크립트\w*"),
    ),
    "id": ("fungsi", "kelas", r"kompilasi\w*"),
    "tr": (r"fonksiyon\w*", r"sınıf\w*"),
    "vi": ("(?:một|các|những) hàm", "hàm (?:số|này|đệ quy)"),
    "zh": ("函数", "编译", "正则"),
    "ja": ("関数", "コンパイル", "クラス", "バグ", "パイソン", "正規表現"),
}
# A Chinese "几" before a measure word asks how many, unless a word before it makes it "a few" (这几个, 好几个,
# 给我几个, 推荐几个, 我有几个) or a time after it says "ago" or "later" (几个月前).
_FEW_BEFORE = ("这", "那", "好", "前", "后", "过", "近", "给我", "举", "列", "写", "推荐", "提供", "问", "我有", "们有")
_HOW_MANY_ZH = (
    "(?=几)"
    + "".join(f"(?<!{word})" for word in _FEW_BEFORE)
    + "几(?:个|只|条|本|种|次|岁|天|年|位|口|件|张)(?!月?[前后])"
)
MATH: Mapping[str, tuple[str, ...]] = {
    "en": ("sum", "product", "solve", "equation", "integral", "percent", "how many", "calculate"),
    "de": ("summe", "produkt", "löse", "lösen", "gleichung", "prozent", "wie viele?", r"(?:be|aus)?rechne\w*"),
    "fr": (
        *("somme", "produit", "résous", "résoudre", "résolvez", "équation", "intégrale", r"pour ?cent\w*"),
        *("combien", "calculer", "calculez", "calcule"),
    ),
    "es": (
        *("la suma", r"suma (?:de|\d)", "producto", r"resuelv\w*", "resolver", r"ecuaci[oó]n", "porcentaje"),
        *(r"por ?ciento", r"cu[aá]nt[oa]s?", "calcula", "calcular"),
    ),
    "pt": (
        *(r"soma (?:de|d[aeo]s?|\d)", "somar", "produto", "resolva", r"equaç(?:ão|ões)", "por cento"),
        *("porcentagem", r"quant[oa]s?", "calcule", "calcular"),
    ),
    "ru": (
        *(r"сумм\w*", r"произведени\w*", "реши", "решить", "решите", r"уравнени\w*", r"интеграл\w*"),
        *(r"процент\w*", "сколько", r"вычисл\w*", r"посчита\w*", r"подсчита\w*", r"рассчита\w*"),
    ),
    "pl": (
        *(r"sum[ęy]", r"(?:jest|to) suma", r"iloczyn\w*", r"rozwiąż\w*", r"równani\w*", r"całk[aęi]", r"procent\w*"),
        *(r"(?:^|(?<=[,.:;!?])|(?<=[,.:;!?] ))ile", r"oblicz\w*", r"policz(?:yć|ymy|cie)?", r"wylicz\w*"),
    ),
    "ar": (
        *("(?:ال)?مجموع", "حاصل ضرب", "حل", "(?:ال)?معادلة", "(?:ال)?تكامل", r"(?:ب|في )ال?مئة", "نسبة مئوية"),
        *("كم(?! الساعة)", "احسب"),
    ),
    "hi": (
        *("कितना", "कितने(?! बजे)", "कितनी", "गणना", "योगफल", "गुणनफल", "हल करो", "हल करें", "हल कीजिए"),
        *("समीकरण", "प्रतिशत"),
    ),
    "ko": (
        *(r"계산\w*", r"합계\w*", r"방정식\w*", r"적분\w*", r"퍼센트\w*", r"얼마(?!나)\w*"),
        *(r"곱하\w*", r"몇 ?(?:개|명|마리|번|살|권|대|년|달|일)\w*"),
    ),
    "id": (r"berapa\w*", r"hitung\w*", "menghitung", r"jumlahkan\w*", "jumlah dari", "hasil kali", r"persen\w*"),
    "tr": (
        *("(?<!saat )kaç", r"hesapla\w*", r"toplam\w*", r"çarpım\w*", r"denklem\w*", "çöz", "çözün", "çözer"),
        *("yüzde", r"integral\w*"),
    ),
    "vi": (
        *("bao nhiêu", "mấy(?! giờ)", r"tính (?:tổng|giá trị|diện tích|chu vi|\d)", "hãy tính", "phương trình"),
        *("phần trăm", "tích phân", "tích của", "tổng của"),
    ),
    "zh": (
        *("总和", "之和", "求和", "乘积", "之积", "求解", "解方程", "方程", "积分", "百分之", "百分比", "多少"),
        *(_HOW_MANY_ZH, "计算"),
    ),
    "ja": ("計算", "積分", "合計", "パーセント", "いくつ", "何個", "何人", "何本", "何匹", "何回", "解いて"),
}
REWRITE: Mapping[str, tuple[str, ...]] = {
    "en": ("rewrite", "rephrase", "paraphrase", "translate", r"summari[sz]e", "shorten", "proofread", "edit"),
    "de": (
        *(r"umschreib\w*", r"umformulier\w*", "formuliere", r"paraphrasier\w*", r"übersetz\w*"),
        *(r"zusammenfass\w*", "fasse", r"kürze\w*", r"korrigier\w*", r"korrekturles\w*", r"bearbeite\w*"),
    ),
    "fr": (
        *(r"r[ée][ée]cri\w*", r"reformul(?:e[rz]?|ar?)", r"paraphrase[rz]", r"tradui\w*", r"traduc\w*"),
        *(r"résum(?:e[rz]?)", "relis", "relire", r"raccourci\w*", r"corrig\w*"),
    ),
    "es": (
        *("resumir", "resumen", r"resume (?:est[eao]s?|el|la|los|las|lo|mi|en)", r"resúm\w*", r"reescrib\w*"),
        *(r"parafrase\w*", r"acort\w*"),
    ),
    "pt": (
        *(r"traduz\w*", r"traduç\w*", "resuma", "(?:um|o) resumo", r"reescrev\w*", "parafraseie"),
        *(r"corrij\w*", r"encurt\w*", "edite", "editar"),
    ),
    "ru": (
        *(r"перепиш\w*", r"перефразир\w*", r"перевед\w*", r"перевод\w*", r"перевест\w*", r"перескаж\w*"),
        *(r"резюмир\w*", r"сократи\w*", r"отредактир\w*"),
    ),
    "pl": (
        *(r"przetłumacz\w*", r"streść\w*", r"streszcz\w*", r"podsumuj\w*", r"przepisz\w*", r"przeformułuj\w*"),
        *(r"sparafrazuj\w*", "popraw", "poprawcie", r"skróć\w*", r"zredaguj\w*"),
    ),
    "ar": (
        *(r"(?:ال)?ترجم\w*", r"لخ[صّ]\w*", "(?:ال)?ملخص", "(?:ال)?تلخيص", "[أا]عد صياغة", "[أا]عد كتابة"),
        *(r"اختصر\w*", "صحح", "دقق"),
    ),
    "hi": (
        *("अनुवाद", "सारांश", "संक्षेप", "दोबारा लिखो", "दोबारा लिखें", "फिर से लिखो", "फिर से लिखें", "सुधारो"),
        *("सुधारें", "सुधारिए"),
    ),
    "ko": (
        *(r"번역\w*", r"요약\w*", r"다시 ?써\w*", r"다시 ?작성\w*", r"바꿔 ?(?:써|말)\w*"),
        *(r"교정\w*", r"줄여\w*", r"편집\w*"),
    ),
    "id": (
        *(r"terjemah\w*", "menerjemahkan", r"ringkas\w*", r"rangkum\w*", "tulis ulang", r"parafrasekan\w*"),
        *(r"koreksi\w*", r"sunting\w*", r"persingkat\w*"),
    ),
    "tr": (r"çevir\w*", r"tercüme\w*", r"özetle(?!,)\w*", r"yeniden yaz\w*", r"düzelt\w*", r"kısalt\w*"),
    "vi": (
        *("dịch (?:sang|ra|câu|đoạn|bài|văn bản|giúp|cho|nội dung)", "bản dịch", "tóm tắt", "viết lại"),
        *("diễn đạt lại", "sửa lỗi", "rút gọn", "hiệu đính", "chỉnh sửa"),
    ),
    "zh": (
        *("改写", "重写", "改述", "翻译", "译成", "译为", "总结", "概括", "摘要", "归纳", "缩短", "精简"),
        *("校对", "润色", "编辑", "修改"),
    ),
    "ja": (
        *("書き直", "書き換え", "言い換え", "翻訳", "訳して", "英訳", "和訳", "要約", "まとめて", "短くして"),
        *("校正", "添削", "編集"),
    ),
}
RECOMMEND: Mapping[str, tuple[str, ...]] = {
    "en": ("recommend", "suggest", "which should", "best way", "ideas? for"),
    "de": (r"empfiehl\w*", r"empfehl\w*", r"vorschl[aä]g\w*", "ideen für", r"beste[nr]? (?:weg|möglichkeit)"),
    "fr": (
        *(r"recommand\w*", r"sugg[eè]re[rz]?", "suggérer", r"idées? (?:de|pour)"),
        *(r"meilleure? fa[cç]on", "meilleur moyen"),
    ),
    "es": (r"recomi[eé]nd\w*", r"recomend\w*", r"sugier\w*", r"suger\w*", "ideas? para", "mejor (?:manera|forma|modo)"),
    "pt": (r"recomend\w*", r"sugir\w*", r"sugest(?:ão|ões)", "i[dé]eias para", "melhor (?:maneira|forma|jeito)"),
    "ru": (r"посовет\w*", r"порекоменд\w*", r"рекоменд\w*", "идеи для", "лучший способ"),
    "pl": (
        *("poleć", "polećcie", "polecasz", "polecisz", r"zaproponuj\w*", r"zasugeruj\w*", r"doradź\w*"),
        *(r"pomysł(?:y|ów) na", "najlepszy sposób"),
    ),
    "ar": (r"اقترح\w*", "أقترح", r"[اأ]نصح\w*", r"تنصح\w*", "نصيحة", r"توصي\w*", "أفكار", "أفضل طريقة"),
    "hi": ("सुझाव", "सुझाओ", "सुझाएं", "सुझाएँ", "सुझाइए", "सिफ़ारिश", "सिफारिश", "अनुशंसा", "सबसे अच्छा तरीका"),
    "ko": (r"추천\w*", r"제안해\w*", r"아이디어\w*", r"(?:가장 좋은|최선의|최고의) 방법\w*"),
    "id": (r"rekomendasi\w*", "merekomendasikan", r"sarankan\w*", "menyarankan", "saran", "ide untuk", "cara terbaik"),
    "tr": (r"öner\w*", r"tavsiye\w*", r"en iyi (?:yol|yöntem)\w*"),
    "vi": ("gợi ý", "đề xuất", "giới thiệu cho (?:tôi|mình|em)", "khuyên (?:tôi|mình|em)", "cách tốt nhất", "ý tưởng"),
    "zh": ("推荐", "建议", "主意", "点子", "最好的方法", "最好的办法", "最佳方法", "最佳办法"),
    "ja": (
        *("おすすめ", "お勧め", "お薦め", "オススメ", "勧めて", "推薦", "提案"),
        *("アイデア", "アイディア", "一番いい方法", "最善の方法"),
    ),
}
# A question: one that begins with a question word (Spanish: with ¿; Russian: with ли after its first word),
# holds one where a language puts it inside the sentence, or ends in ?, in Chinese and Japanese its full-width
# ？, in Arabic and Persian ؟, or in a question ending of its own.
QUESTION_STARTS: Mapping[str, tuple[str, ...]] = {
    "en": ("who", "what", "when", "where", "which", "why", "how", "is", "are", "does", "did", "can"),
    "de": (
        *("wer", "was", "wann", "wo", "woher", "wohin", "warum", "wieso", "weshalb", "wie", r"welche[rsmn]?"),
        *("ist", "sind", "kannst", "kann", r"könn\w*", "gibt es", "hast"),
    ),
    "fr": (
        *("qui", "que", r"qu['’]\w*", "quoi", "quand", "où", r"quel(?:le)?s?", "pourquoi", "est-ce", "peux-tu"),
        *("pouvez-vous", "puis-je", "y a-t-il"),
    ),
    "es": (
        *(r"qui[eé]n\w*", "qué", "cuándo", "dónde", "donde", r"cu[aá]l\w*", r"por qu[eé]"),
        *("cómo", "puedes", "podrías"),
    ),
    "pt": (
        *("quem", "o que", "quando", "onde", "qual", "quais", r"por qu[eê]", "como", "pode", "podes"),
        *("você pode", "existe"),
    ),
    "ru": (
        *("кто", "что", "когда", "где", "куда", "откуда", "почему", "зачем", "как", r"как(?:ой|ая|ое|ие|ов)"),
        *("чей", "можешь", "можете", r"\w+ ли"),
    ),
    "pl": (
        *("kto", r"co(?=\s)", "kiedy", "gdzie", "dlaczego", "czemu", "jak", r"jak(?:i|a|ie|iego)", "czy"),
        *(r"któr(?:y|a|e|ego)", "możesz", "możecie"),
    ),
    "ar": ("هل", "ما", "ماذا", "متى", "أين", "لماذا", "كيف", "أي", r"من(?!\s+فضلك)"),
    "id": (
        *("apa", "apakah", "siapa", "kapan", "di ?mana", "ke ?mana", "mengapa", "kenapa", "bagaimana", "bisakah"),
        *("bolehkah", "adakah", "yang mana"),
    ),
    "vi": ("có phải", "bạn có thể"),
}
QUESTION_WORDS: Mapping[str, tuple[str, ...]] = {
    "hi": (
        *("क्या", "कौन", "कौनसा", "कौनसी", "कब", "कहाँ", "कहां", "क्यों", "कैसे", "कैसा", "कैसी", "किस"),
        *("किसने", "कितने बजे"),
    ),
    "ko": (
        *(r"무엇(?!이든)\w*", r"뭐(?!든)\w*", r"무슨", r"누구(?!나|든)\w*", "누가", r"언제(?!나|든)\w*"),
        *(r"어디(?!든|서나)\w*", "왜", r"어떻게(?!든)\w*", r"어때\w*", "얼마나", "어느(?! 날)", r"몇 ?시\w*"),
    ),
    "tr": (
        *("neden", "niçin", "niye", "nasıl", "nerede", "nereye", "nereden", r"neresi\w*", r"hangi\w*", "nedir"),
        *("ne zaman", "ne kadar", "ne demek", r"kim(?:dir|di|in|i|e|den)", "saat kaç"),
        *(r"m[iıuü](?:s[iıuü]n|y[iıuü]m|s[iıuü]n[iıuü]z|y[iıuü]z|d[iıuü]r)", r"m[iıuü][.\s]*$"),
    ),
    "vi": (
        *("là gì", "cái gì", "làm gì", "gì (?:vậy|thế)", "tại sao", "vì sao", "ở đâu", "khi nào", "(?<!không )bao giờ"),
        *("thế nào", "làm sao", "là ai", "ai là", "ai đã", "mấy giờ", r"(?:không|chưa|nào)[.\s]*$"),
    ),
    "zh": ("什么", "谁", "哪", "为什么", "怎么", "怎样", "如何", "是否", "是不是", "几点", r"[吗呢][。.！!\s]*$"),
    "ja": (
        *("何(?!か)", "誰", "いつ(?!も)", "どこ", "どれ", "どの", "なぜ", "どうして", "どうやって", "どのよう"),
        *("どう(?!ぞ|も)", r"か[。.\s]*$", r"の\s*$"),
    ),
}
QUESTION_ENDS = (r"[?\uff1f\u061f]\s*$", r"(?<=\w)(?:까|까요|나요)[.\s]*$")  # the second: Korean's


def _words(*words: str) -> str:
    """An alternation of words (regular expressions, lower case) that match whole, in any script."""
    return rf"(?<!{_LETTER})(?:{'|'.join(words)})(?!{_LETTER})"


def _run_together(*words: str) -> str:
    """An alternation of Chinese and Japanese words, found anywhere; tried only where such a letter is, as
    each of its words would be tried at every position of the text otherwise."""
    return rf"(?=[{RUN_TOGETHER}])(?:{'|'.join(words)})"


def _of(table: Mapping[str, tuple[str, ...]], run_together: bool) -> tuple[str, ...]:
    """The words of a table's languages that run words together, or of the others."""
    return tuple(
        word
        for language, words in table.items()
        if (language in RUN_TOGETHER_LANGUAGES) == run_together
        for word in words
    )


def _rule(table: Mapping[str, tuple[str, ...]], *patterns: str) -> re.Pattern[str]:
    """A category's rule, over lower-cased text: a few alternations, since each part is tried at every
    position of the text (a category's words are one ``_words`` part, not one a language). A part with no
    words is left out: an empty alternation matches everywhere, and every prompt would take the category."""
    spaced, run_together = _of(table, False), _of(table, True)
    parts = ([_words(*spaced)] if spaced else []) + ([_run_together(*run_together)] if run_together else [])
    return re.compile("|".join((*parts, *patterns)))


# The first rule that matches names the task; TMO's categories plus the ones a laptop assistant sees most.
TASK_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("code", _rule(CODE, "```")),
    ("math", _rule(MATH, r"\d\s*[-+*/^=×÷−＋－＊／＝]\s*\d")),
    ("rewrite", _rule(REWRITE)),
    ("recommend", _rule(RECOMMEND)),
    ("query", _rule(QUESTION_WORDS, r"^\s*(?:¿|" + _words(*_of(QUESTION_STARTS, False)) + ")", *QUESTION_ENDS)),
)
TASKS = ("chat", *(name for name, _ in TASK_RULES))


def task_of(prompt: str) -> str:
    text = prompt if len(prompt) <= 2 * EDGE_CHARS else prompt[:EDGE_CHARS] + "\n" + prompt[-EDGE_CHARS:]
    text = text.lower()
    for name, pattern in TASK_RULES:
        if pattern.search(text):
            return name
    return "chat"
