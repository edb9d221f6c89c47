"""A new user's walk with GGUFs of other model families: Gemma, Mistral, Llama 3, Phi, Qwen, and a base model
without a chat template. No hub is reachable, so each is the embedded model's weights with that family's
real chat template (tests/fixtures/chat_templates) and token settings written into its metadata: what the
daemon does with the template is what the family's own GGUF gets."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest

from locod.daemon.backends import Prompt
from locod.daemon.config import LocalModelConfig
from locod.daemon.gguf import _ARRAY, _FIXED, _STRING
from locod.daemon.local import LocalBackend, ModelZoo
from locod.errors import ModelError

from .conftest import REPO
from .test_http_door import http_daemon, request

TEMPLATES = REPO / "tests" / "fixtures" / "chat_templates"
_BOOL, _UINT32 = 7, 4


def _value_end(data: bytes, at: int, kind: int) -> int:
    """Where the GGUF value of ``kind`` that begins at ``at`` ends."""
    if kind in _FIXED:
        return at + struct.calcsize(_FIXED[kind])
    if kind == _STRING:
        return at + 8 + struct.unpack_from("<Q", data, at)[0]
    assert kind == _ARRAY
    item, count = struct.unpack_from("<IQ", data, at)
    at += 12
    if item in _FIXED:
        return at + count * struct.calcsize(_FIXED[item])
    for _ in range(count):
        at = _value_end(data, at, item)
    return at


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _entry(key: str, value: str | int | bool) -> bytes:
    """One key-value entry: a string, a bool or a uint32 (as token ids and flags are stored)."""
    if isinstance(value, bool):
        return _string(key) + struct.pack("<I?", _BOOL, value)
    if isinstance(value, int):
        return _string(key) + struct.pack("<II", _UINT32, value)
    return _string(key) + struct.pack("<I", _STRING) + _string(value)


def rewrite_gguf(source: Path, target: Path, changes: dict[str, str | int | bool | None]) -> Path:
    """A copy of ``source`` with each key of ``changes`` set to its value (None: removed), as gguf's
    gguf_new_metadata.py writes one: the key-value section rebuilt, the tensors' table copied, and the tensor
    data realigned after it (its offsets count from the data section's start, so they still hold)."""
    data = source.read_bytes()
    version, tensors, count = struct.unpack_from("<IQQ", data, 4)
    at, entries, alignment = 24, [], 32
    for _ in range(count):
        start, length = at, struct.unpack_from("<Q", data, at)[0]
        key = data[at + 8 : at + 8 + length].decode()
        at = _value_end(data, at + 12 + length, struct.unpack_from("<I", data, at + 8 + length)[0])
        if key == "general.alignment":
            alignment = struct.unpack_from("<I", data, at - 4)[0]
        if key not in changes:
            entries.append(data[start:at])
    entries += [_entry(key, value) for key, value in changes.items() if value is not None]
    table = at
    for _ in range(tensors):
        at += 8 + struct.unpack_from("<Q", data, at)[0]
        at += 4 + 8 * struct.unpack_from("<I", data, at)[0] + 4 + 8  # dimensions, type, offset
    head = b"GGUF" + struct.pack("<IQQ", version, tensors, len(entries)) + b"".join(entries) + data[table:at]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(head + b"\0" * (-len(head) % alignment) + data[-(-at // alignment) * alignment :])
    return target


# Each family's metadata: its template, and the tokens its GGUF says begin and end text.
FAMILIES: dict[str, dict[str, str | int | bool | None]] = {
    "gemma": {
        "tokenizer.chat_template": (TEMPLATES / "gemma-2.jinja").read_text(),
        "tokenizer.ggml.add_bos_token": True,
    },
    "mistral": {"tokenizer.chat_template": (TEMPLATES / "mistral-v0.1.jinja").read_text()},
    # Llama 3's eos is <|end_of_text|>, its turns end with <|eot_id|>: here eos is <|endoftext|> (0), and
    # the turn's end <|im_end|> (2), which llama.cpp takes as an end of generation by its text, as it does
    # <|eot_id|>
    "llama3": {"tokenizer.chat_template": (TEMPLATES / "llama-3.jinja").read_text(), "tokenizer.ggml.eos_token_id": 0},
    "phi3": {"tokenizer.chat_template": (TEMPLATES / "phi-3.jinja").read_text()},
    "qwen": {"tokenizer.chat_template": (TEMPLATES / "qwen-2.5.jinja").read_text()},
    # Zephyr's (a Mistral fine-tune: its GGUF asks for a BOS, its template writes none)
    "zephyr": {
        "tokenizer.chat_template": (TEMPLATES / "zephyr.jinja").read_text(),
        "tokenizer.ggml.add_bos_token": True,
    },
    "base": {"tokenizer.chat_template": None},
}


def family_gguf(model_path: Path, folder: Path, family: str) -> Path:
    return rewrite_gguf(model_path, folder / f"{family}.gguf", FAMILIES[family])


def zoo_of(model_path: Path, folder: Path, family: str) -> LocalBackend:
    """The local backend, in this process, with the family's GGUF as its one model."""
    model = LocalModelConfig(name=family, path=str(family_gguf(model_path, folder, family)), n_ctx=1024)
    return LocalBackend(ModelZoo([model], folder, 4096, 1, cache_mb=0))


def read_back(local: LocalBackend, family: str, messages: list[dict[str, object]]) -> tuple[str, str]:
    """(the answer, the text the model read and wrote: its context's tokens) of one greedy turn."""
    prompt = Prompt(messages=messages, max_tokens=24, temperature=0.0, seed=1, on_delta=lambda _: None)
    answer = local.generate(family, local.fit(family, prompt)).text
    llm = local.zoo.get(family).llm
    return answer, llm.detokenize(llm.input_ids[: llm.n_tokens].tolist(), special=True).decode(errors="replace")


DIALOGUE = [
    {"role": "system", "content": "You answer as the pirate Zanzibar."},
    {"role": "user", "content": "Hi, who are you?"},
    {"role": "assistant", "content": "I am a bot."},
    {"role": "user", "content": "Sorry, my last message was cut."},  # a stopped reply the client dropped
    {"role": "user", "content": "Name a color."},
]


@pytest.mark.parametrize("family", ["gemma", "mistral", "llama3", "phi3", "qwen"])
def test_each_familys_template_reads_the_system_prompt_and_two_user_messages_in_a_row(
    model_path: Path, tmp_path: Path, family: str
) -> None:
    """Gemma's template raised on any system message ('System role not supported') and, as Mistral's, on two
    user messages in a row (a client's history after a reply it stopped): each such turn failed
    `model_template`. And for a GGUF whose template llama-cpp-python knows (Mistral's, Llama 3's), it put its
    own format in the template's place, whose Mistral one dropped the system message without a word and ran
    the two user messages together. Now the GGUF's own template formats every turn, and what it refuses is
    folded: the system prompt into the first user message, a run of one role into one message."""
    local = zoo_of(model_path, tmp_path, family)
    _, read = read_back(local, family, [dict(m) for m in DIALOGUE])
    assert "pirate Zanzibar" in read and "my last message was cut" in read and "Name a color." in read, read
    assert local.zoo.get(family).llm.chat_format == "chat_template.default"


@pytest.mark.parametrize(("family", "marker"), [("gemma", "<end_of_turn>"), ("phi3", "<|end|>")])
def test_an_answer_ends_at_the_templates_end_of_turn(
    model_path: Path, tmp_path: Path, family: str, marker: str
) -> None:
    """A template's end of turn written as text (a vocabulary without it as a token) stopped nothing: the
    answer went on past it, turn after made-up turn, to max_tokens. The marker the template writes after an
    answer is now a stop string."""
    local = zoo_of(model_path, tmp_path, family)
    messages: list[dict[str, object]] = [dict(m) for m in (*DIALOGUE[1:3], DIALOGUE[4])]
    answer, read = read_back(local, family, messages)
    assert marker not in answer and read.count(marker) >= 2, (answer, read)


@pytest.mark.parametrize("family", ["gemma", "zephyr", "phi3"])
def test_a_prompt_begins_with_one_bos_where_the_gguf_asks_for_it(model_path: Path, tmp_path: Path, family: str) -> None:
    """llama-cpp-python adds no BOS to what a GGUF's template renders, so that one the template writes
    (Gemma's `{{ bos_token }}`) is not doubled: a template that writes none (Zephyr's) left the prompt of a
    GGUF that asks for one (add_bos_token) without it, where llama.cpp's own server begins with it. Now such
    a template is given one; a GGUF that asks for none (Phi 3's, the embedded one's) gets none."""
    local = zoo_of(model_path, tmp_path, family)
    read_back(local, family, [{"role": "user", "content": "Hi"}])
    llm = local.zoo.get(family).llm
    wanted = [llm.token_bos()] if FAMILIES[family].get("tokenizer.ggml.add_bos_token") else []
    assert [t for t in llm.input_ids[:2].tolist() if t == llm.token_bos()] == wanted


def test_a_new_user_chats_with_a_gemma_gguf_through_the_cli_and_the_http_door(
    daemon_factory: Any, model_path: Path, tmp_path: Path
) -> None:
    """The walk as a user takes it: the GGUF in the config, a session of several turns with `locod ask`,
    then an OpenAI client's history with a system prompt and two user messages in a row. Each of these
    failed before ('its chat template cannot format this conversation', HTTP 500)."""
    gemma = family_gguf(model_path, tmp_path / "models", "gemma")
    models = [{"name": "smollm2-135m-instruct", "path": str(model_path)}, {"name": "gemma", "path": str(gemma)}]
    handle, port = http_daemon(daemon_factory, {"routing": {"mode": "local"}, "local": {"models": models}})
    for question in ("Hi, who are you?", "Name a color."):
        asked = handle.cli("ask", question, "--model", "gemma", "--session", "walk", "--max-tokens", "16")
        assert asked.returncode == 0, asked.stderr
    chat = {"model": "gemma", "messages": DIALOGUE, "max_tokens": 16, "temperature": 0}
    status, body = request(port, "POST", "/v1/chat/completions", chat, {"Content-Type": "application/json"})
    assert status == 200, body
    assert "<end_of_turn>" not in body["choices"][0]["message"]["content"]
    assert "local model gemma: its chat template refuses a system message" in handle.log()


def test_a_gguf_without_a_chat_template_answers_and_the_log_says_what_to_set(
    daemon_factory: Any, model_path: Path, tmp_path: Path
) -> None:
    """A base model's GGUF has no chat template: llama-cpp-python writes its prompts in Llama 2's format,
    without a word, and the user wondered at the answers. It still answers; the log names the file and
    chat_format, once."""
    base = family_gguf(model_path, tmp_path / "models", "base")
    models = [{"name": "smollm2-135m-instruct", "path": str(model_path)}, {"name": "base", "path": str(base)}]
    handle = daemon_factory({"routing": {"mode": "local"}, "local": {"models": models}})
    client = handle.client(turn_timeout_s=120)
    for _ in range(2):
        assert client.ask("Name a color.", model="base", max_tokens=8, session="b").done.outcome == "ok"
    said = f"local model base: {base} has no chat template (tokenizer.chat_template)"
    assert handle.log().count(said) == 1 and "chat_format" in handle.log()


def test_a_template_that_refuses_every_turn_is_still_named_at_the_turn(model_path: Path, tmp_path: Path) -> None:
    """What to fold is learnt from renders at load: a template that refuses even one user message has
    nothing to fold, loads, and each turn says its message (model_template), as before."""
    refuses = rewrite_gguf(
        model_path, tmp_path / "refuses.gguf", {"tokenizer.chat_template": "{{ raise_exception('No chat here') }}"}
    )
    local = LocalBackend(ModelZoo([LocalModelConfig(name="refuses", path=str(refuses))], tmp_path, 4096, 1, 0))
    with pytest.raises(ModelError, match="No chat here") as failed:
        read_back(local, "refuses", [{"role": "user", "content": "Hi"}])
    assert failed.value.code == "model_template"


def test_a_chat_format_naming_a_template_the_gguf_lacks_is_refused_by_name(
    daemon_factory: Any, model_path: Path
) -> None:
    """`chat_format = "chat_template.tool_use"` (a template some GGUFs hold beside their default) passes the
    config's check, which cannot read the file: on a GGUF without it, each turn of the model failed as an
    internal error with llama-cpp-python's list of its own formats. Its load now refuses it, naming the
    model, the file and the templates it does hold; the other models answer on."""
    models = [
        {"name": "smollm2-135m-instruct", "path": str(model_path)},
        {"name": "tools", "path": str(model_path), "chat_format": "chat_template.tool_use"},
    ]
    handle = daemon_factory({"routing": {"mode": "local"}, "local": {"models": models}})
    refused = handle.cli("ask", "Hi", "--model", "tools", "--max-tokens", "4")
    assert refused.returncode == 2, refused.stderr
    said = f"local model 'tools': chat_format = 'chat_template.tool_use', but {model_path} holds no such template"
    assert said in refused.stderr and "(it holds: chat_template.default)" in refused.stderr, refused.stderr
    assert handle.cli("ask", "Hi", "--max-tokens", "4").returncode == 0
