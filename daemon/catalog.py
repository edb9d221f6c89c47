"""The user's own models: ``pulled.toml`` in the models directory, written by ``locod models pull``.

The config loader adds each entry to ``local.models`` (a model of the same name in the config file wins),
so a pulled model can be ``local.default`` or a request's model as soon as the daemon (re)loads its config.
The daemon only reads this file; only the ``locod models pull`` and ``rm`` commands write it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from locod.daemon.config import MAX_CONFIG_BYTES, Config, LocalModelConfig
from locod.daemon.gguf import CutShort, NotGGUF, check_whole, is_gguf, kv_bytes_per_token, summary
from locod.daemon.modelfile import resolve_path
from locod.daemon.regular_file import written_whole
from locod.daemon.typed_toml import build_table, in_range, read_toml
from locod.errors import ConfigError
from locod.terminal import aligned

MANIFEST = "pulled.toml"


@dataclass(frozen=True)
class PulledModel:
    name: str
    file: str  # relative to the models directory
    size: int
    sha256: str
    origin: str  # what was given to `locod models pull`: a URL or hf://repo/file
    quantisation: str
    context_length: int  # the context the model was trained for, from its GGUF header (0: not stated)
    n_ctx: int = field(metadata=in_range(128, 1 << 20))  # the context the daemon loads it with
    pulled: str = ""  # ISO time

    def as_local(self) -> LocalModelConfig:
        return LocalModelConfig(name=self.name, path=self.file, n_ctx=self.n_ctx)


@dataclass(frozen=True)
class RemovedModel:
    """A model ``locod models rm`` removed, kept in the manifest as ``[[removed]]``: a daemon offers it until
    its next reload, and a turn naming it is told it was removed and where to pull it from again, not that
    its file is missing from a path to fix."""

    name: str
    file: str
    origin: str


MAX_REMOVED = 32  # the latest removals the manifest remembers


def manifest_path(models_dir: Path) -> Path:
    return models_dir / MANIFEST


def pulled_models(models_dir: Path) -> list[PulledModel]:
    """The entries of the user manifest, checked like the config file; [] when nothing was pulled."""
    return _entries(models_dir, "model", PulledModel)


def removed_models(models_dir: Path) -> list[RemovedModel]:
    """The models ``locod models rm`` removed, the latest last."""
    return _entries(models_dir, "removed", RemovedModel)


def _entries(models_dir: Path, kind: str, entry: type[Any]) -> list[Any]:
    path = manifest_path(models_dir)
    try:
        table = read_toml(path, MAX_CONFIG_BYTES)  # read at every reload
    except FileNotFoundError:
        return []
    entries = table.get(kind, [])
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: {kind} must be an array of tables ([[{kind}]])")
    return [build_table(entry, item, str(path), f"{kind}[{i}].") for i, item in enumerate(entries)]


def save(models_dir: Path, models: list[PulledModel], removed: list[RemovedModel]) -> None:
    """Rewrite the manifest atomically: a reader sees the old file or the new one, never half of it, and
    after a power loss too (the new file's bytes reach the disk before its name does; without it some
    filesystems bring the manifest back empty, and every pulled model drops out of the config unsaid)."""
    path = manifest_path(models_dir)
    lines = ["# Models added with `locod models pull`; `locod models rm NAME` removes one. Written by locod."]
    for kind, entries in (("model", models), ("removed", removed[-MAX_REMOVED:])):
        for entry in entries:
            lines.append(f"\n[[{kind}]]")
            # JSON strings and integers are valid TOML values
            lines.extend(f"{key} = {json.dumps(value)}" for key, value in dataclasses.asdict(entry).items())
    with written_whole(path, path.with_name(f".{MANIFEST}.partial"), mode=0o666) as out:  # a service reads it
        out.write(("\n".join(lines) + "\n").encode())


def register(models_dir: Path, model: PulledModel) -> None:
    """Add ``model``, replacing an entry of the same name (and forgetting its removal)."""
    kept = [m for m in pulled_models(models_dir) if m.name != model.name]
    save(models_dir, [*kept, model], [r for r in removed_models(models_dir) if r.name != model.name])


def unregister(models_dir: Path, name: str) -> PulledModel | None:
    """Drop the entry called ``name``, remembering it as removed; returns it, or None when there was none."""
    models = pulled_models(models_dir)
    found = next((m for m in models if m.name == name), None)
    if found is not None:
        removed = [r for r in removed_models(models_dir) if r.name != name]
        removed.append(RemovedModel(name, found.file, found.origin))
        save(models_dir, [m for m in models if m.name != name], removed)
    return found


def gone_file_remedy(models_dir: Path, name: str, file: str) -> str | None:
    """What a user does about pulled model ``name`` whose ``file`` is gone: it was removed, or its file
    deleted by hand; either way ``locod models pull`` from where it came. None: locod did not pull it (or
    the manifest cannot be read, which the next reload says)."""
    try:
        pulled, removed = pulled_models(models_dir), removed_models(models_dir)
    except ConfigError:
        return None
    kept = next((m for m in pulled if m.name == name and m.file == file), None)
    if kept is not None:
        return f"its file was deleted; pull it again: `locod models pull {kept.origin} --name {name}`"
    gone = next((r for r in reversed(removed) if r.name == name and r.file == file), None)
    if gone is None:
        return None
    return f"it was removed (`locod models rm {name}`); pull it again: `locod models pull {gone.origin} --name {name}`"


@dataclass(frozen=True)
class ModelRow:
    """One line of ``locod models list``: what the config names and what the file says about itself."""

    name: str
    path: Path
    size: int | None  # None: the file is missing
    quantisation: str
    n_ctx: int
    context_length: int | None
    memory_mb: float | None  # MiB, weights and the KV cache at n_ctx: what it takes of local.memory_budget_mb
    default: bool
    loaded: bool | None  # None: the daemon is not running

    def as_dict(self) -> dict[str, object]:
        return {**dataclasses.asdict(self), "path": str(self.path)}

    def cells(self) -> tuple[str, ...]:
        size = "missing" if self.size is None else f"{self.size / 2**20:.0f}"
        trained = f" of {self.context_length}" if self.context_length else ""
        memory = "-" if self.memory_mb is None else f"{self.memory_mb:.0f}"
        loaded = "-" if self.loaded is None else "yes" if self.loaded else "no"
        name = self.name + (" (default)" if self.default else "")
        return name, size, self.quantisation, f"{self.n_ctx}{trained}", memory, loaded, str(self.path)


def model_rows(config: Config, resident: list[str] | None) -> list[ModelRow]:
    """Every local model of ``config`` (pulled ones included), described from its GGUF header."""
    rows = []
    for model in config.local.models:
        path = resolve_path(model, config.models_dir)
        size, quant, trained, memory = None, "-", None, None
        if path.is_file():
            size = path.stat().st_size
            try:
                meta = check_whole(path)  # what the daemon checks before it offers the model
                info = summary(meta)
                quant, trained = info.quantisation, info.context_length
                memory = (size + kv_bytes_per_token(meta) * model.n_ctx) / 2**20
            except CutShort:
                quant = "cut short"
            except NotGGUF:
                quant = "damaged GGUF" if is_gguf(path) else "not a GGUF"
            except OSError:  # one unreadable file lists as such, not as the whole list's error
                quant = "unreadable"
        loaded = None if resident is None else model.name in resident
        rows.append(
            ModelRow(
                model.name, path, size, quant, model.n_ctx, trained, memory, model.name == config.local.default, loaded
            )
        )
    return rows


def table(rows: list[ModelRow]) -> list[str]:
    """Rows as aligned text columns under a header, which names the unit: MiB (2^20 bytes), as every size and
    memory figure locod shows is, and as local.memory_budget_mb counts."""
    header = ("name", "size MiB", "quant", "context", "memory MiB", "loaded", "path")
    cells = [header, *(row.cells() for row in rows)]
    return aligned(cells)
