"""Where a configured local model's file is, and whether llama.cpp can be asked to load it.

Kept apart from local.py, which imports llama.cpp: the learner (priors keyed by the file), `locod models`
and `locod models pull` need the path without paying for that import.
"""

from __future__ import annotations

from pathlib import Path

from locod.daemon.config import LocalModelConfig
from locod.daemon.gguf import is_gguf
from locod.errors import ModelError


def resolve_path(model: LocalModelConfig, models_dir: Path) -> Path:
    """The model's file: its configured path, relative ones under the models directory."""
    path = Path(model.path).expanduser()
    return path if path.is_absolute() else models_dir / path


def check_model_file(model: LocalModelConfig, models_dir: Path) -> Path:
    """Fail early, and by name, on a missing or non-GGUF file: a traceback from llama.cpp helps nobody."""
    path = resolve_path(model, models_dir)
    if not path.is_file():
        raise ModelError(
            f"model {model.name!r}: file {path} not found; run `locod models fetch` for the "
            "embedded model, `locod models pull` for your own, or fix its path in the config",
            code="model_missing",
        )
    if not is_gguf(path):
        raise ModelError(f"model {model.name!r}: {path} is not a GGUF file", code="model_corrupt")
    return path
