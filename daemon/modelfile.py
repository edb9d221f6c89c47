"""Where a configured local model's file is, and whether llama.cpp can be asked to load it.

Kept apart from local.py, which imports llama.cpp: the learner (priors keyed by the file), `locod models`
and `locod models pull` need the path without paying for that import.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pwd
import threading
from pathlib import Path

from locod.daemon.config import EMBEDDED_MODEL, LocalModelConfig
from locod.daemon.gguf import CutShort, NotGGUF, check_whole, is_gguf
from locod.daemon.regular_file import file_stamp
from locod.errors import ModelError

log = logging.getLogger(__name__)

# A model file's fingerprint: its header (architecture, rope and norm settings, tokenizer, tensor layout)
# and blocks spread over its weights.
FINGERPRINT_HEAD = 8 << 20
FINGERPRINT_BLOCKS = 64
FINGERPRINT_BLOCK = 64 << 10


def resolve_path(model: LocalModelConfig, models_dir: Path) -> Path:
    """The model's file: its configured path, relative ones under the models directory."""
    path = Path(model.path).expanduser()
    return path if path.is_absolute() else models_dir / path


def check_model_file(model: LocalModelConfig, models_dir: Path) -> Path:
    """Fail early, and by name, on a missing, unreadable or non-GGUF file: a traceback from llama.cpp (or an
    OSError that names no model) helps nobody."""
    path = resolve_path(model, models_dir)
    embedded = (model.name, model.path) == (EMBEDDED_MODEL.name, EMBEDDED_MODEL.path)  # n_gpu_layers may differ
    if not path.is_file():
        pulled = None if embedded or path.exists() else _pulled_remedy(model, models_dir)
        if pulled:
            raise ModelError(f"model {model.name!r}: {pulled}", code="model_missing")
        remedy = (
            "run `locod models fetch`"
            if embedded
            else "fix its path in the config, or download it with `locod models pull`"
        )
        found = "is not a file (name the .gguf file itself)" if path.exists() else "not found"
        raise ModelError(f"model {model.name!r}: file {path} {found}; {remedy}", code="model_missing")
    again = "run `locod models fetch`" if embedded else "copy or download it again (`locod models pull`)"
    try:
        if not is_gguf(path):
            fix = (
                "run `locod models fetch`"
                if embedded
                else "point its path at a GGUF model, or download one with `locod models pull`"
            )
            raise ModelError(f"model {model.name!r}: {path} is not a GGUF file; {fix}", code="model_corrupt")
        check_whole(path)
    except CutShort as exc:  # nothing in the config to fix: the file is what a stopped copy or download leaves
        raise ModelError(
            f"model {model.name!r}: {exc}, as a copy or download that stopped leaves it; {again}", code="model_corrupt"
        ) from None
    except NotGGUF as exc:
        raise ModelError(f"model {model.name!r}: {exc}; {again}", code="model_corrupt") from None
    except OSError as exc:  # a file the daemon's user may not read: a service's user, its sandbox
        raise ModelError(
            f"model {model.name!r}: cannot read {path} ({exc.strerror or exc}); make it readable by the user "
            f"the daemon runs as, {_user()}",
            code="model_missing",
        ) from None
    return path


def _pulled_remedy(model: LocalModelConfig, models_dir: Path) -> str | None:
    """What to do about a model ``locod models pull`` brought whose file is gone (removed, or deleted by
    hand): the catalog imports this module, so it is imported here."""
    from locod.daemon.catalog import gone_file_remedy

    return gone_file_remedy(models_dir, model.name, model.path)


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a uid without a passwd entry (a container's)
        return f"uid {os.geteuid()}"


def fingerprint(path: Path) -> str:
    """A hash that tells a model file from another of the same size (another fine-tune of the same base and
    quantisation, the same weights under another rope base) without reading gigabytes: the file's size, its
    first FINGERPRINT_HEAD bytes and FINGERPRINT_BLOCKS blocks spread evenly over the rest."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        digest.update(size.to_bytes(8, "little"))
        digest.update(os.pread(fd, FINGERPRINT_HEAD, 0))
        rest = size - FINGERPRINT_HEAD
        for i in range(FINGERPRINT_BLOCKS if rest > 0 else 0):
            digest.update(os.pread(fd, FINGERPRINT_BLOCK, FINGERPRINT_HEAD + rest * i // FINGERPRINT_BLOCKS))
    finally:
        os.close(fd)
    return digest.hexdigest()[:32]


class ModelFiles:
    """Which configured local models have a file llama.cpp could load, asked by the router at each turn:
    a model whose file is missing or not a GGUF (a typo in a second model's path, a file deleted by hand)
    is left out of routing rather than failing the turns routed to it. A file is looked at again only when
    its size or modification time changed (one stat per model per turn), and each problem is logged once."""

    def __init__(self) -> None:
        self._seen: dict[Path, tuple[tuple[int, int] | None, ModelError | None]] = {}
        self._said: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def problem(self, model: LocalModelConfig, models_dir: Path, left_out: bool = True) -> ModelError | None:
        """Why ``model`` cannot be loaded (the error ``check_model_file`` would raise: its code says
        missing or corrupt), or None. ``left_out``: routing leaves the model out for it, which is logged once
        (the default stays on offer: status asks of it with False). Cached by the file's stamp: the check
        reads the whole GGUF header, a tenth of a second on the status call's serving loop."""
        path = resolve_path(model, models_dir)
        signature = file_stamp(path)
        with self._lock:
            seen = self._seen.get(path)
        if seen is not None and seen[0] == signature and signature is not None:
            return seen[1]
        problem: ModelError | None = None
        try:
            check_model_file(model, models_dir)
        except ModelError as exc:
            problem = exc
        with self._lock:
            self._seen[path] = (signature, problem)
            if left_out and problem is not None and (model.name, problem.message) not in self._said:
                self._said.add((model.name, problem.message))
                log.warning("local model %r is left out of routing: %s", model.name, problem.message)
        return problem
