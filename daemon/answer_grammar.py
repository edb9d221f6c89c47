"""The grammar a local answer follows when the request asks for JSON (OpenAI's ``response_format``).

llama.cpp then samples only tokens that keep the answer valid: an answer in JSON mode is a JSON object, one
given a schema follows it. llama-cpp-python builds such a grammar from ``{"type": "json_object"}`` alone and
reads no ``json_schema``, whose request it would answer in prose, so locod builds both itself.

A schema is a client's, and what llama.cpp makes of its grammar runs natively on the local model's thread,
where a failure is the whole daemon's: a grammar its parser refuses leaves a null sampler that crashes the
first token (a ``maxLength`` over about 1000 does), one nested too deep overflows the thread's stack, and
one that admits no character (a pattern's ``[^\\x00-\\U0010FFFF]``) aborts the process at the first token
when nothing is left to sample. What it costs grows too: the converter writes a ``minLength`` of 10^9 out as
gigabytes, and every enum value is a grammar stack checked against the whole vocabulary at each token. So a
schema is bounded first, its grammar built within a budget, checked by llama.cpp's parser and for classes
that match nothing, and refused by name (``bad_field``) before the turn waits for the local model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import threading
from collections import OrderedDict
from typing import Any

import llama_cpp
from llama_cpp.llama_grammar import JSON_GBNF, PRIMITIVE_RULES, BuiltinRule, LlamaGrammar, SchemaConverter

from locod.daemon.json_pattern import json_text_pattern
from locod.daemon.logs import Throttle
from locod.errors import ProtocolError, first_line

log = logging.getLogger(__name__)

# A repetition llama.cpp unrolls, nested (maxLength, maxItems, a pattern's {m,n}): its parser refuses
# a little over 1000 of them ("exceeds sane defaults"), and the converter writes each one out.
MAX_REPEAT = 1000
REPEATS = ("minLength", "maxLength", "minItems", "maxItems")
INSTANCES = ("enum", "const", "default", "examples")  # keywords whose values are JSON data, not schemas
MAX_ENUM_VALUES = 1000  # all the schema's enums together, OpenAI's bound: each is a stack checked per token
MAX_PATTERN_CHARS = 1000  # a pattern's literal text is written out once for each repetition of it
MAX_GRAMMAR_CHARS = 128 << 10  # what llama.cpp parses, and walks at each token
MAX_RULES = 1000  # the converter finds a free name for a rule by trying them in turn
# A repetition's bounds; the spaces after a bound are read only after its digits, since with none they are
# the spaces before it, and trying each split of a run of spaces between the two made a pattern's check
# quadratic in its length (about 50 ms a pattern of "{" and spaces; a schema may hold thousands of patterns).
QUANTIFIER = re.compile(r"\{\s*(\d*)(?:(?<=\d)\s*)?(?:,\s*(\d*)(?:(?<=\d)\s*)?)?\}")
CACHED = 16  # grammars kept: a turn's schema is built before it waits, at each fitting and as it opens
GBNF_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)", re.DOTALL)
SIMPLE_ESCAPES = {"t": "\t", "r": "\r", "n": "\n"}
UNICODE_END = 0x10FFFF
HEX = "[0-9a-fA-F]"
# a string's character as JSON has it: no raw control character (the converter's own takes any)
JSON_CHAR = BuiltinRule(rf'[^"\\\x00-\x1F] | "\\" (["\\/bfnrt] | "u" {HEX} {HEX} {HEX} {HEX})', [])
# the keywords llama.cpp's converter reads a value's shape from: a schema with none of them (``{}``, one of
# annotations such as a title or description alone) admits any JSON value, as JSON Schema has it
SHAPE_KEYWORDS = frozenset(
    ("$ref", "oneOf", "anyOf", "allOf", "type", "const", "enum", "properties", "additionalProperties", "items")
    + ("prefixItems", "pattern", "format", "minLength", "maxLength", "minItems", "maxItems", "required")
)
PARSER_REFUSAL = "error parsing grammar: "  # llama.cpp's parser's line, before it writes the whole grammar
MAX_REASON_CHARS = 200  # of the parser's reason, which quotes the grammar from where it stopped
PARSE_FAILED = "failed to parse grammar"  # llama.cpp's log line after it
STDERR = 2
_stderr_lock = threading.Lock()
# A refused schema costs a client a request and no turn: said once an interval, or a loop of them fills the log.
_refusals = Throttle(log)


class _Refused(Exception):
    """A schema locod does not turn into a grammar, with why in a client's words."""


class _BoundedConverter(SchemaConverter):
    """llama.cpp's converter, stopped once its grammar grows past the budget (each rule it adds is bounded
    by the schema's checks, so no one rule runs away before the count)."""

    def __init__(self) -> None:
        super().__init__(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        self.chars = 0

    def _add_primitive(self, name: str, rule: BuiltinRule) -> str:
        """llama.cpp's rules, but a string's character as JSON has it: the converter's takes a raw newline or
        any control character, which a model held to it writes into a long string, and no JSON parser reads."""
        return str(super()._add_primitive(name, JSON_CHAR if name == "char" else rule))

    def _visit_pattern(self, pattern: str, name: str) -> str:
        """The converter's rule for a pattern, read as one over the string's JSON text (json_pattern)."""
        return str(super()._visit_pattern(json_text_pattern(pattern), name))

    def visit(self, schema: dict[str, Any], name: str) -> str:
        """The converter's rule, but a schema that says nothing of its value's shape admits any JSON value
        (the converter refused it as "Unrecognized schema"), save at the root, where it is an object, as in
        JSON mode (OpenAI holds a schema's root to an object)."""
        if isinstance(schema, dict) and not SHAPE_KEYWORDS & set(schema):
            if name:
                return str(self._add_primitive("value", PRIMITIVE_RULES["value"]))
            schema = {}
        return str(super().visit(schema, name))

    def _add_rule(self, name: str, rule: str) -> str:
        self.chars += len(rule)
        if self.chars > MAX_GRAMMAR_CHARS or len(self._rules) >= MAX_RULES:
            raise _Refused(
                f"its grammar grows past {MAX_GRAMMAR_CHARS >> 10} KiB or {MAX_RULES} rules: a schema that large "
                "would slow every token of the local model"
            )
        return str(super()._add_rule(name, rule))


def _bounds_problem(schema: Any) -> str | None:
    """Why the schema asks for more than a local model is held to (None: it does not), read before anything
    is built from it. A keyword's value is read only where it has the keyword's type, so a property named like
    a keyword is left be, and data (an enum's values, examples) is not read as schemas."""
    values, pending = 0, [schema]
    while pending:
        node = pending.pop()
        if isinstance(node, list):
            pending.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        for key in REPEATS:
            if isinstance(node.get(key), int) and node[key] > MAX_REPEAT:
                return f"{key} {node[key]} is over the {MAX_REPEAT} a local model is held to"
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            if len(pattern) > MAX_PATTERN_CHARS:
                return f"a pattern of {len(pattern)} characters is over the {MAX_PATTERN_CHARS} a local model takes"
            counts = [int(n) for match in QUANTIFIER.finditer(pattern) for n in match.groups() if n]
            if counts and max(counts) > MAX_REPEAT:
                return f"the pattern's repetition {{{max(counts)}}} is over the {MAX_REPEAT} a local model is held to"
        if isinstance(node.get("enum"), list):
            values += len(node["enum"])
            if values > MAX_ENUM_VALUES:
                return f"its enums hold over {MAX_ENUM_VALUES} values, more than a local model is held to"
        pending.extend(value for key, value in node.items() if key not in INSTANCES)
    return None


def _code_points(body: str) -> list[int]:
    """The characters of a GBNF literal's or character class's body, its escapes decoded."""
    points: list[int] = []
    at = 0
    for match in GBNF_ESCAPE.finditer(body):
        points.extend(map(ord, body[at : match.start()]))
        escape = match.group(1)
        points.append(ord(SIMPLE_ESCAPES.get(escape, escape)) if len(escape) == 1 else int(escape[1:], 16))
        at = match.end()
    points.extend(map(ord, body[at:]))
    return points


def _class_ranges(body: str) -> list[tuple[int, int]]:
    """The code point ranges a character class's body (between the brackets, past a ``^``) names."""
    points, i = _code_points(body), 0
    ranges: list[tuple[int, int]] = []
    while i < len(points):
        if i + 2 < len(points) and points[i + 1] == ord("-"):
            ranges.append((points[i], points[i + 2]))
            i += 3
        else:
            ranges.append((points[i], points[i]))
            i += 1
    return ranges


def _matches_a_character(negated: bool, ranges: list[tuple[int, int]]) -> bool:
    """Whether a class admits a character a token can hold (NUL ends llama.cpp's token text: never one)."""
    if not negated:
        return any(high >= max(low, 1) for low, high in ranges)
    uncovered = 1
    for low, high in sorted(ranges):
        if low > uncovered:
            return True
        uncovered = max(uncovered, high + 1)
    return uncovered <= UNICODE_END


def _dead_end(grammar: str) -> str | None:
    """A character class or literal of the grammar that no token can match (None: there is none): llama.cpp
    finds no token to sample there and aborts the process."""
    i = 0
    while i < len(grammar):
        c = grammar[i]
        if c in '"[':
            close = "]" if c == "[" else '"'
            end = i + 1
            while end < len(grammar) and grammar[end] != close:
                end += 2 if grammar[end] == "\\" else 1
            body = grammar[i + 1 : end]
            if c == "[":
                negated = body.startswith("^")
                if not _matches_a_character(negated, _class_ranges(body[negated:])):
                    return f"[{body}]"
            elif 0 in _code_points(body):
                return f'"{body}"'
            i = end + 1
        else:
            i += 1
    return None


def _parser_refusal(grammar: str) -> str | None:
    """Why llama.cpp's own parser refuses the grammar (None: it takes it; it needs no vocabulary for that).
    The parser writes the whole grammar to stderr with its reason, a client's up to MAX_GRAMMAR_CHARS into
    the daemon's journal at each request: its stderr is caught while it parses, the reason logged as one
    line, and anything else written meanwhile (another thread's) is passed on."""
    with _stderr_lock, tempfile.TemporaryFile() as caught:
        saved = os.dup(STDERR)
        try:
            os.dup2(caught.fileno(), STDERR)
            sampler = llama_cpp.llama_sampler_init_grammar(None, grammar.encode(), b"root")
            sys.stderr.flush()  # llama.cpp's log line, written through Python's stderr
        finally:
            os.dup2(saved, STDERR)
            os.close(saved)
        caught.seek(0)
        written = caught.read().decode(errors="replace").splitlines()
    if sampler:
        llama_cpp.llama_sampler_free(sampler)
    reasons = [line.split(PARSER_REFUSAL, 1)[1] for line in written if PARSER_REFUSAL in line]
    parsers = {"", PARSE_FAILED, *grammar.splitlines()}  # its reason quotes the grammar's rest, line by line
    others = [line for line in written if PARSER_REFUSAL not in line and line not in parsers]
    if others:
        os.write(STDERR, ("\n".join(others) + "\n").encode())
    if sampler:
        return None
    reason = reasons[0][:MAX_REASON_CHARS] if reasons else "no reason given"
    _refusals.say(
        "parser",
        logging.WARNING,
        "llama.cpp's grammar parser refused a schema's grammar (its client is told): %s",
        reason,
    )
    return reason


def _schema_grammar(schema: dict[str, Any]) -> str:
    """The GBNF of a JSON schema, within locod's bounds (``_Refused`` says why not)."""
    problem = _bounds_problem(schema)
    if problem:
        raise _Refused(problem)
    converter = _BoundedConverter()
    # llama.cpp's resolver reads nothing beside a $ref: a root that is one (pydantic's recursive model) left
    # the $refs of its $defs unresolved, and was refused
    converter.resolve_refs({key: value for key, value in schema.items() if key != "$ref"}, "stdin")
    converter.visit(converter.resolve_refs(schema, "stdin"), "")
    grammar = str(converter.format_grammar())
    refusal = _parser_refusal(grammar)
    if refusal:
        raise _Refused(f"llama.cpp's grammar parser refuses what it makes of it: {refusal}")
    dead = _dead_end(grammar)
    if dead:
        raise _Refused(f"{dead[:60]} matches no character a model can write")
    return grammar


class _Built:
    """The grammars of the schemas asked for lately, by their text's digest (the text may be megabytes)."""

    def __init__(self) -> None:
        self._grammars: OrderedDict[bytes, str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, schema: dict[str, Any]) -> str:
        text = json.dumps(schema)  # key order kept: the answer writes properties in the schema's order
        digest = hashlib.sha256(text.encode()).digest()
        with self._lock:
            if digest in self._grammars:
                self._grammars.move_to_end(digest)
                return self._grammars[digest]
        grammar = _schema_grammar(json.loads(text))  # a copy: the converter rewrites the schema's $refs
        with self._lock:
            self._grammars[digest] = grammar
            while len(self._grammars) > CACHED:
                self._grammars.popitem(last=False)
        return grammar


BUILT = _Built()


def answer_grammar(response_format: dict[str, Any] | None) -> LlamaGrammar | None:
    """The grammar of ``response_format`` (``locod.protocol.response_format``'s: None is plain text), or a
    ``bad_field`` refusal (kind ``protocol``, as every ``bad_field``: a client sorts errors by kind), before
    the turn is accepted, of a schema llama.cpp's converter cannot follow
    (a remote ``$ref``, an unknown type) or locod holds no local answer to (the module's bounds): answered
    without it, the JSON would not be the schema's."""
    if response_format is None:
        return None
    if response_format["type"] == "json_object":
        return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
    try:
        grammar = BUILT.get(response_format["json_schema"]["schema"])
    except Exception as exc:  # the converter's ValueError, AssertionError, KeyError, RecursionError ...
        why = str(exc) if isinstance(exc, _Refused) else first_line(exc)
        raise ProtocolError(
            f"'response_format': a local model cannot follow this JSON schema ({why}); send a schema "
            "llama.cpp's converter takes (local $refs, no unknown types) within locod's bounds (docs/http.md), "
            "or name a cloud model to answer it",
            code="bad_field",
        ) from None
    return LlamaGrammar.from_string(grammar, verbose=False)
