"""docs/protocol.md, README.md and docs/operations.md against the code they describe: users copy error codes,
frame fields, op results and command lines from them, so a code, field, op or flag added, renamed or removed
must show there too (as tests/test_docs.py holds docs/configuration.md to the config schema)."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from locod import errors, protocol

REPO = Path(__file__).resolve().parent.parent
PROTOCOL = (REPO / "docs" / "protocol.md").read_text()
# The HTTP door's own error codes (OpenAI's error shape, docs/http.md) are not locod.errors codes.
HTTP_ERROR_CALLS = {"HttpError", "bad"}
CODE = re.compile(r"[a-z][a-z_]*[a-z]")


def section(doc: str, title: str) -> str:
    """The part of ``doc`` under ``## title``, up to the next section of that level."""
    start = doc.index(f"\n## {title}\n")
    end = doc.find("\n## ", start + 1)
    return doc[start : end if end > 0 else len(doc)]


def _called(node: ast.Call) -> str:
    func = node.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def codes_in_source() -> dict[str, str]:
    """Every error code the code gives a LocodError ({code: where}): a class's own ``code``, a ``code=`` given
    to any call or as a parameter's default, an ``ErrorFrame``'s, and the cloud's codes, which
    daemon/cloud.py and daemon/bounded_http.py pass on positionally."""
    found: dict[str, str] = {}
    for path in [*REPO.glob("api/*.py"), *REPO.glob("daemon/*.py"), *REPO.glob("policy/*.py")]:
        tree = ast.parse(path.read_text(), str(path))
        cloud = path.name in ("cloud.py", "bounded_http.py")
        for node in ast.walk(tree):
            values: list[ast.expr] = []
            if isinstance(node, ast.Call) and _called(node) not in HTTP_ERROR_CALLS:
                values += [k.value for k in node.keywords if k.arg == "code"]
                if _called(node) == "ErrorFrame":
                    values += node.args[1:2]
            elif isinstance(node, ast.ClassDef) and path.name == "errors.py":
                values += [
                    s.value for s in node.body if isinstance(s, ast.Assign) and ast.unparse(s.targets[0]) == "code"
                ]
            elif isinstance(node, ast.arguments):
                named = [*node.posonlyargs, *node.args][-len(node.defaults) :] if node.defaults else []
                values += [d for a, d in zip(named, node.defaults) if a.arg == "code"]
            if cloud and isinstance(node, ast.Constant) and str(node.value).startswith("cloud_"):
                values.append(node)
            for value in values:
                if isinstance(value, ast.Constant) and isinstance(value.value, str) and CODE.fullmatch(value.value):
                    found.setdefault(value.value, f"{path.relative_to(REPO)}:{value.lineno}")
    return found


SOURCE_CODES = codes_in_source()
ERRORS = section(PROTOCOL, "Errors")
# The codes a table of the section names in its first column ("`db_locked` (kind `storage`)": both).
TABLE_CODES = {c for cell in re.findall(r"^\| (`[^|]*)\|", ERRORS, re.M) for c in re.findall(r"`([a-z_]+)`", cell)}


def test_the_code_scan_finds_the_codes_of_every_kind() -> None:
    """The scan itself: codes given by keyword, by a class, by a default, positionally in the cloud's code."""
    for code in ("bad_field", "busy", "cloud_stream_cut", "cloud_http", "internal", "extra_frames", "policy_slow"):
        assert code in SOURCE_CODES, code
    assert "reasoning_effort" not in SOURCE_CODES  # the HTTP door's parameter names are no codes


def test_every_error_class_is_a_documented_kind() -> None:
    kinds = dict(re.findall(r"^\| `([a-z_]+)` \| `([A-Za-z]+)` \|", ERRORS, re.M))
    classes = {cls.code: cls.__name__ for cls in errors._BY_CODE.values()}
    assert kinds == classes, "docs/protocol.md's kind table must list every class of api/errors.py, by its code"


@pytest.mark.parametrize("code", sorted(SOURCE_CODES))
def test_every_error_code_is_documented_with_when_it_happens(code: str) -> None:
    assert code in TABLE_CODES, f"{code} ({SOURCE_CODES[code]}) is not in a table of docs/protocol.md's Errors"


def test_every_code_the_docs_name_exists() -> None:
    unknown = sorted(TABLE_CODES - set(SOURCE_CODES))
    assert not unknown, f"docs/protocol.md's Errors names codes locod never gives: {unknown}"
