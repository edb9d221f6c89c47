"""The grammar a local answer follows when the request asks for JSON (OpenAI's ``response_format``).

llama.cpp then samples only tokens that keep the answer valid: an answer in JSON mode is a JSON object, one
given a schema follows it. llama-cpp-python builds such a grammar from ``{"type": "json_object"}`` alone and
reads no ``json_schema``, whose request it would answer in prose, so locod builds both itself.
"""

from __future__ import annotations

import json
from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

from locod.errors import RequestError, first_line


def answer_grammar(response_format: dict[str, Any] | None) -> LlamaGrammar | None:
    """The grammar of ``response_format`` (``locod.protocol.response_format``'s: None is plain text), or a
    ``bad_field`` refusal, before the turn is accepted, of a schema llama.cpp's converter cannot follow
    (a remote ``$ref``, an unknown type): answered without it, the JSON would not be the schema's."""
    if response_format is None:
        return None
    if response_format["type"] == "json_object":
        return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
    try:
        return LlamaGrammar.from_json_schema(json.dumps(response_format["json_schema"]["schema"]), verbose=False)
    except Exception as exc:  # the converter's ValueError, AssertionError, KeyError, RecursionError ...
        raise RequestError(
            f"'response_format': a local model cannot follow this JSON schema ({first_line(exc)}); send a schema "
            "llama.cpp's converter takes (local $refs, no unknown types), or name a cloud model to answer it",
            code="bad_field",
        ) from None
