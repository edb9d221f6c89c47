"""A prompt's task category in Portuguese, Korean, Hindi, Polish, Indonesian, Turkish and Vietnamese, and two
gaps of the last round.

Before, each rule knew its words in English and seven languages (tests/test_routing36.py): of the 153
prompts below in the seven new languages that are not chat, 15 got their category (an English "Python" or
"SQL" in them, or a word Portuguese shares with Spanish or French), the rest `chat`; a Japanese question
ending in の was chat, and a Chinese 几个 ("a few") made a recommendation or a chat message `math`; a Spanish
"funcionario" (an employee), a French "fonctionne" and a German "funktioniert" (it works) were `code`. Now
each rule's words are a table of languages (policy/tasks.py), and the traces' prompts keep their categories,
so the replay figures in docs/routing.md stand.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from locod.policy.tasks import (
    CODE,
    LANGUAGES,
    MATH,
    QUESTION_STARTS,
    QUESTION_WORDS,
    RECOMMEND,
    REWRITE,
    TASKS,
    _rule,
    task_of,
)

# The last round's check, run here too: no prompt of the three traces changes its category, so the replay
# figures in docs/routing.md stand (Portuguese "como", Polish "co" and "ile", Indonesian "apa" are words
# an English prompt may hold).
from tests.test_routing36 import test_the_traces_keep_their_categories  # noqa: F401

NEW_LANGUAGES = ("pt", "ko", "hi", "pl", "id", "tr", "vi")
NAMES = {
    "en": "English",
    "de": "German",
    "fr": "French",
    "es": "Spanish",
    "pt": "Portuguese",
    "ru": "Russian",
    "pl": "Polish",
    "ar": "Arabic",
    "hi": "Hindi",
    "ko": "Korean",
    "id": "Indonesian",
    "tr": "Turkish",
    "vi": "Vietnamese",
    "zh": "Chinese",
    "ja": "Japanese",
}

# (language, category, prompt): the common shapes of each category, then chat, with hard negatives: a chat
# message that mentions a number, a word that begins like a code word ("funcionário", "klasyczny").
PROMPTS = (
    # Portuguese
    ("pt", "code", "Escreva uma função em Python que ordene uma lista"),
    ("pt", "code", "Minha consulta SQL está muito lenta"),
    ("pt", "code", "Crie uma classe Java para representar um carro"),
    ("pt", "math", "Quanto é a soma de 45 e 67"),
    ("pt", "math", "Quantas pernas tem uma aranha"),
    ("pt", "math", "Calcule 15 por cento de 80"),
    ("pt", "math", "Resolva a equação x ao quadrado igual a nove"),
    ("pt", "rewrite", "Traduza esta frase para o inglês: bom dia"),
    ("pt", "rewrite", "Resuma este artigo em três frases"),
    ("pt", "rewrite", "Reescreva isto de forma mais educada: me dá o dinheiro"),
    ("pt", "rewrite", "Corrija os erros deste texto"),
    ("pt", "rewrite", "Faça um resumo deste texto"),
    ("pt", "recommend", "Recomende um bom livro de ficção científica"),
    ("pt", "recommend", "Sugira um nome para o meu gato"),
    ("pt", "recommend", "Me dê ideias para uma festa de aniversário"),
    ("pt", "query", "Qual é a capital do Canadá"),
    ("pt", "query", "Por que o céu é azul"),
    ("pt", "query", "Quem escreveu Hamlet"),
    ("pt", "query", "O que é um buraco negro"),
    ("pt", "query", "Onde fica Lisboa"),
    ("pt", "query", "Como faço um bolo de chocolate"),
    ("pt", "query", "Você pode me ajudar com uma coisa"),
    ("pt", "query", "Existe vida em Marte"),
    ("pt", "query", "Qual é o resultado de 7 vezes 6"),
    ("pt", "chat", "Escreva um poema sobre o mar"),
    ("pt", "chat", "Conte-me uma história sobre um dragão"),
    ("pt", "chat", "Olá, prazer em conhecer você"),
    ("pt", "chat", "Tenho 3 gatos e um cachorro em casa"),
    ("pt", "chat", "Minha amiga Soma mora em Lisboa"),
    ("pt", "chat", "Em resumo, foi um ótimo dia"),
    ("pt", "chat", "Meu funcionário chegou atrasado hoje"),
    ("pt", "chat", "A classificação do campeonato saiu"),
    # Korean
    ("ko", "code", "리스트를 정렬하는 파이썬 함수를 작성해 줘"),
    ("ko", "code", "내 SQL 쿼리가 너무 느려요"),
    ("ko", "code", "이 코드에 버그가 있어요"),
    ("ko", "math", "45와 67의 합계를 계산해 줘"),
    ("ko", "math", "거미는 다리가 몇 개예요"),
    ("ko", "math", "80의 15퍼센트를 계산하세요"),
    ("ko", "math", "x의 제곱이 9인 방정식을 풀어 줘"),
    ("ko", "math", "이 가방은 얼마예요"),
    ("ko", "rewrite", "이 문장을 영어로 번역해 줘"),
    ("ko", "rewrite", "이 기사를 세 문장으로 요약해 주세요"),
    ("ko", "rewrite", "이 문장을 더 공손하게 다시 써 줘"),
    ("ko", "rewrite", "이 글을 좀 줄여 주세요"),
    ("ko", "recommend", "좋은 공상과학 소설을 추천해 주세요"),
    ("ko", "recommend", "생일 파티 아이디어 좀 주세요"),
    ("ko", "recommend", "영어를 배우는 가장 좋은 방법은"),
    ("ko", "query", "캐나다의 수도는 어디예요"),
    ("ko", "query", "하늘은 왜 파래요"),
    ("ko", "query", "햄릿을 누가 썼어요"),
    ("ko", "query", "블랙홀이 뭐야"),
    ("ko", "query", "지금 몇 시예요"),
    ("ko", "query", "내일 비가 올까요"),
    ("ko", "query", "이 식당은 언제 문을 열어요"),
    ("ko", "query", "김치는 어떻게 만들어요"),
    ("ko", "query", "한국어를 할 수 있습니까"),
    ("ko", "query", "파리는 어느 나라의 수도예요"),
    ("ko", "query", "서울에서 부산까지 얼마나 걸려요"),
    ("ko", "chat", "바다에 대한 시를 써 줘"),
    ("ko", "chat", "용에 대한 이야기를 들려줘"),
    ("ko", "chat", "안녕하세요, 만나서 반갑습니다"),
    ("ko", "chat", "나는 고양이 3마리를 키워요"),
    ("ko", "chat", "우리 어머니는 언제나 바쁘세요"),
    ("ko", "chat", "누구나 실수를 해요"),
    ("ko", "chat", "어느 날 고양이를 만났어요"),
    ("ko", "chat", "클래식 음악을 좋아해요"),
    # Hindi
    ("hi", "code", "पायथन में एक फ़ंक्शन लिखो जो सूची को क्रमबद्ध करे"),
    ("hi", "code", "मेरी SQL क्वेरी बहुत धीमी है"),
    ("hi", "math", "मकड़ी के कितने पैर होते हैं"),
    ("hi", "math", "80 का 15 प्रतिशत कितना है"),
    ("hi", "math", "पैंतालीस और सड़सठ का योगफल बताओ"),
    ("hi", "math", "इस समीकरण को हल करो"),
    ("hi", "rewrite", "इस वाक्य का अंग्रेज़ी में अनुवाद करो"),
    ("hi", "rewrite", "इस लेख का सारांश तीन वाक्यों में दीजिए"),
    ("hi", "rewrite", "इसे दोबारा लिखो ज़्यादा विनम्र तरीके से"),
    ("hi", "recommend", "कोई अच्छी विज्ञान कथा किताब सुझाओ"),
    ("hi", "recommend", "जन्मदिन की पार्टी के लिए कुछ सुझाव दीजिए"),
    ("hi", "recommend", "हिंदी सीखने का सबसे अच्छा तरीका बताइए"),
    ("hi", "query", "कनाडा की राजधानी क्या है"),
    ("hi", "query", "आसमान नीला क्यों होता है"),
    ("hi", "query", "हैमलेट किसने लिखा"),
    ("hi", "query", "क्या तुम मेरी मदद कर सकते हो"),
    ("hi", "query", "दिल्ली कहाँ है"),
    ("hi", "query", "चाय कैसे बनाते हैं"),
    ("hi", "query", "अभी कितने बजे हैं"),
    ("hi", "chat", "समुद्र पर एक कविता लिखो"),
    ("hi", "chat", "मुझे एक ड्रैगन की कहानी सुनाओ"),
    ("hi", "chat", "नमस्ते, आपसे मिलकर खुशी हुई"),
    ("hi", "chat", "मेरे पास 3 बिल्लियाँ हैं"),
    ("hi", "chat", "किताब मेज़ पर है"),
    ("hi", "chat", "यह एक क्लासिक फ़िल्म है"),
    # Polish
    ("pl", "code", "Napisz funkcję w Pythonie, która sortuje listę"),
    ("pl", "code", "Moje zapytanie SQL jest za wolne"),
    ("pl", "math", "Ile nóg ma pająk"),
    ("pl", "math", "Oblicz 15 procent z 80"),
    ("pl", "math", "Rozwiąż równanie x do kwadratu równa się dziewięć"),
    ("pl", "math", "Jaka jest suma czterdziestu pięciu i sześćdziesięciu siedmiu"),
    ("pl", "rewrite", "Przetłumacz to zdanie na angielski: dzień dobry"),
    ("pl", "rewrite", "Streść ten artykuł w trzech zdaniach"),
    ("pl", "rewrite", "Podsumuj załączony dokument"),
    ("pl", "rewrite", "Przepisz to grzeczniej: daj mi pieniądze"),
    ("pl", "recommend", "Poleć mi dobrą książkę science fiction"),
    ("pl", "recommend", "Zaproponuj pomysły na przyjęcie urodzinowe"),
    ("pl", "query", "Jaka jest stolica Kanady"),
    ("pl", "query", "Dlaczego niebo jest niebieskie"),
    ("pl", "query", "Kto napisał Hamleta"),
    ("pl", "query", "Czy masz czas jutro"),
    ("pl", "query", "Gdzie leży Kraków"),
    ("pl", "query", "Która jest godzina"),
    ("pl", "chat", "Napisz wiersz o morzu"),
    ("pl", "chat", "Opowiedz mi historię o smoku"),
    ("pl", "chat", "Cześć, miło cię poznać"),
    ("pl", "chat", "Mam 3 koty i psa"),
    ("pl", "chat", "Policzek mnie boli"),
    ("pl", "math", "Powiedz mi, ile to kosztuje"),
    ("pl", "chat", "Funkcjonariusz policji był miły"),
    ("pl", "chat", "To był klasyczny film"),
    # Indonesian
    ("id", "code", "Tulis fungsi Python yang mengurutkan daftar"),
    ("id", "code", "Query SQL saya terlalu lambat"),
    ("id", "math", "Berapa jumlah kaki laba-laba"),
    ("id", "math", "Hitung 15 persen dari 80"),
    ("id", "math", "Berapakah hasil kali tujuh dan delapan"),
    ("id", "rewrite", "Terjemahkan kalimat ini ke bahasa Inggris: selamat pagi"),
    ("id", "rewrite", "Ringkas artikel ini dalam tiga kalimat"),
    ("id", "rewrite", "Tulis ulang kalimat ini dengan lebih sopan"),
    ("id", "recommend", "Rekomendasikan buku fiksi ilmiah yang bagus"),
    ("id", "recommend", "Berikan ide untuk pesta ulang tahun"),
    ("id", "recommend", "Apa cara terbaik belajar bahasa Inggris"),
    ("id", "query", "Apa ibu kota Kanada"),
    ("id", "query", "Mengapa langit berwarna biru"),
    ("id", "query", "Siapa yang menulis Hamlet"),
    ("id", "query", "Di mana letak Bandung"),
    ("id", "query", "Bagaimana cara membuat nasi goreng"),
    ("id", "query", "Apakah kamu bisa berbahasa Indonesia"),
    ("id", "chat", "Tulis puisi tentang laut"),
    ("id", "chat", "Ceritakan kisah tentang naga"),
    ("id", "chat", "Halo, senang bertemu denganmu"),
    ("id", "chat", "Saya punya 3 kucing di rumah"),
    ("id", "chat", "Pegawai fungsional itu ramah"),
    # Turkish
    ("tr", "code", "Listeyi sıralayan bir Python fonksiyonu yaz"),
    ("tr", "code", "SQL sorgum çok yavaş"),
    ("tr", "code", "Araba için bir sınıf tanımla"),
    ("tr", "math", "Bir örümceğin kaç bacağı var"),
    ("tr", "math", "80'in yüzde 15'ini hesapla"),
    ("tr", "math", "Kırk beş ile altmış yedinin toplamı nedir"),
    ("tr", "math", "x kare eşittir dokuz denklemini çöz"),
    ("tr", "rewrite", "Bu cümleyi İngilizceye çevir: günaydın"),
    ("tr", "rewrite", "Bu makaleyi üç cümleyle özetle"),
    ("tr", "rewrite", "Bunu daha kibar bir şekilde yeniden yaz: bana parayı ver"),
    ("tr", "rewrite", "Bu metindeki hataları düzelt"),
    ("tr", "recommend", "Bana iyi bir bilim kurgu kitabı öner"),
    ("tr", "recommend", "Doğum günü partisi için fikir önerir misin"),
    ("tr", "recommend", "İngilizce öğrenmek için bir tavsiye verir misin"),
    ("tr", "query", "Kanada'nın başkenti neresi"),
    ("tr", "query", "Gökyüzü neden mavi"),
    ("tr", "query", "Yarın yağmur yağacak mı"),
    ("tr", "query", "Bana yardım eder misin"),
    ("tr", "query", "Kara delik nedir"),
    ("tr", "query", "Ankara'ya ne kadar sürer"),
    ("tr", "query", "İstanbul nerede"),
    ("tr", "query", "Saat kaç"),
    ("tr", "query", "Kek nasıl yapılır"),
    ("tr", "query", "Bu doğru mu"),
    ("tr", "chat", "Deniz hakkında bir şiir yaz"),
    ("tr", "chat", "Bana bir ejderha hikayesi anlat"),
    ("tr", "chat", "Merhaba, tanıştığımıza memnun oldum"),
    ("tr", "chat", "Evde 3 kedim var"),
    ("tr", "chat", "Ali ile Ayşe dün sinemaya gitti"),
    ("tr", "chat", "Özetle, harika bir gündü"),
    # Vietnamese
    ("vi", "code", "Viết một hàm Python để sắp xếp danh sách"),
    ("vi", "code", "Câu truy vấn SQL của tôi quá chậm"),
    ("vi", "math", "Con nhện có bao nhiêu chân"),
    ("vi", "math", "Tính 15 phần trăm của 80"),
    ("vi", "math", "Giải phương trình x bình phương bằng chín"),
    ("vi", "math", "Tổng của bốn mươi lăm và sáu mươi bảy là bao nhiêu"),
    ("vi", "math", "Lớp này có mấy học sinh"),
    ("vi", "rewrite", "Dịch câu này sang tiếng Anh: chào buổi sáng"),
    ("vi", "rewrite", "Tóm tắt bài báo này trong ba câu"),
    ("vi", "rewrite", "Viết lại câu này lịch sự hơn: đưa tiền đây"),
    ("vi", "rewrite", "Sửa lỗi chính tả trong đoạn văn này"),
    ("vi", "recommend", "Gợi ý cho tôi một cuốn sách khoa học viễn tưởng hay"),
    ("vi", "recommend", "Cho tôi vài ý tưởng cho bữa tiệc sinh nhật"),
    ("vi", "recommend", "Cách tốt nhất để học tiếng Anh"),
    ("vi", "query", "Thủ đô của Canada là gì"),
    ("vi", "query", "Tại sao bầu trời màu xanh"),
    ("vi", "query", "Ai là tác giả của Hamlet"),
    ("vi", "query", "Bạn có khỏe không"),
    ("vi", "query", "Hà Nội ở đâu"),
    ("vi", "query", "Bây giờ là mấy giờ"),
    ("vi", "query", "Làm thế nào để nấu phở"),
    ("vi", "query", "Khi nào thì trời mưa"),
    ("vi", "query", "Sông dài nhất Việt Nam là sông nào"),
    ("vi", "query", "Mozart sinh năm nào"),
    ("vi", "chat", "Viết một bài thơ về biển"),
    ("vi", "chat", "Kể cho tôi một câu chuyện về con rồng"),
    ("vi", "chat", "Xin chào, rất vui được gặp bạn"),
    ("vi", "chat", "Tôi có 3 con mèo"),
    ("vi", "chat", "Dịch bệnh đã qua rồi"),
    ("vi", "chat", "Máy tính của tôi rất nhanh"),
    ("vi", "chat", "Tôi sẽ không bao giờ quên"),
)
# The last round's gaps: a Japanese question ending in の (or asking with どう), and 几 that says "a few".
GAPS = (
    # Japanese
    ("ja", "query", "明日は雨が降るの"),
    ("ja", "query", "どうしたの"),
    ("ja", "query", "もう帰るの"),
    ("ja", "query", "それは本当なの"),
    ("ja", "query", "この映画はどうだった"),
    ("ja", "chat", "どうぞよろしくお願いします"),
    ("ja", "chat", "どうもありがとう"),
    # Chinese
    ("zh", "math", "蜘蛛有几个腿"),
    ("zh", "math", "你有几个兄弟姐妹"),
    ("zh", "math", "一年有几个月"),
    ("zh", "math", "你今年几岁"),
    ("zh", "recommend", "推荐几个好看的电影"),
    ("zh", "recommend", "给我几个建议"),
    ("zh", "chat", "我有几个问题想问你"),
    ("zh", "chat", "好几个人都这么说"),
    ("zh", "chat", "几个月前我去了北京"),
    ("zh", "chat", "举几个例子吧"),
    ("zh", "query", "这几个词是什么意思"),
)
# Words of two scripts in one prompt, and other languages' forms an English or European prompt holds.
MIXED = (
    ("mixed", "code", "用Python写一个函数"),
    ("mixed", "code", "Pythonで関数を書いて"),
    ("mixed", "code", "파이썬으로 sort 함수를 만들어 줘"),
    ("mixed", "code", "Python में sort function लिखो"),
    ("mixed", "rewrite", "Translate 안녕하세요 into English"),
    ("mixed", "rewrite", "이 문장을 English로 번역해 줘"),
    ("mixed", "rewrite", 'Traduza "good morning" para o português'),
    ("mixed", "query", "SQL이 뭐예요"),
    ("mixed", "math", "3 + 4 का जवाब क्या है"),
    # Arabic, checked: its words covered these shapes already
    ("ar", "query", "كيف حالك"),
    ("ar", "chat", "لدي 3 قطط"),
    # English, Spanish, French, German
    ("en", "chat", "I have 3 cats at home"),
    ("en", "chat", "My friend Ile is from Nigeria"),
    ("en", "chat", "Co-workers came to the party"),
    ("en", "chat", "Tell me about AI in medicine"),
    ("en", "chat", "Kim and I went hiking"),
    ("fr", "chat", "Je ne sais pas quoi faire"),
    ("es", "chat", "Mi perro es muy grande"),
    ("es", "chat", "Mi funcionario favorito se jubiló"),
    ("fr", "chat", "Mon téléphone ne fonctionne plus"),
    ("de", "chat", "Mein Handy funktioniert nicht mehr"),
    ("de", "code", "Schreibe zwei Funktionen in Python"),
)


def _id(row: tuple[str, str, str]) -> str:
    return f"{row[0]}-{row[1]}-{row[2][:24]}"


def test_each_new_language_has_a_prompt_of_every_category() -> None:
    for language in NEW_LANGUAGES:
        assert {category for lang, category, _ in PROMPTS if lang == language} == set(TASKS), language


@pytest.mark.parametrize("row", PROMPTS + GAPS + MIXED, ids=_id)
def test_a_prompt_gets_its_category(row: tuple[str, str, str]) -> None:
    _, category, prompt = row
    assert task_of(prompt) == category


def test_every_language_has_words_for_every_rule_and_the_doc_names_it() -> None:
    """A table's languages are the ones LANGUAGES names, each has words of every category and of a
    question, and docs/routing.md lists them all."""
    for table in (CODE, MATH, REWRITE, RECOMMEND):
        assert tuple(table) == LANGUAGES
    assert set(QUESTION_STARTS) | set(QUESTION_WORDS) == set(LANGUAGES)
    section = Path(__file__).resolve().parent.parent.joinpath("docs", "routing.md").read_text()
    section = section.split("### A turn's task category", 1)[1].split("###", 1)[0]
    assert all(NAMES[language] in section for language in LANGUAGES), section


def test_a_devanagari_word_ends_where_its_marks_do() -> None:
    """Devanagari writes vowels as combining marks, which are not letters to a regular expression: unless
    the marks count as part of a word, "कब" (when) is found in "कबूतर" (pigeon) and "किस" (which) in
    "किसान" (farmer)."""
    for prompt in ("कबूतर छत पर बैठा है", "किसान खेत में काम करता है"):
        assert task_of(prompt) == "chat", prompt


def test_a_rule_whose_table_has_no_words_of_a_kind_does_not_match_everywhere() -> None:
    """A table without Chinese or Japanese words (or without any others) made an empty alternation, which
    matches at every such character: every CJK prompt would have taken the category."""
    english_only, chinese_only = _rule({"en": ("sum",)}), _rule({"zh": ("总和",)})
    assert english_only.search("这是什么") is None and english_only.search("what is the sum")
    assert chinese_only.search("what is this") is None and chinese_only.search("求总和")
