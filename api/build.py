"""Which code a locod process runs: a digest of its packages' Python files.

A daemon keeps the code it started with (docs/operations.md, Upgrades), and ``__version__`` stays the same
across a `git pull` of a checkout: the digest is what tells `locod status` that the daemon it asks runs other
code than the command itself (started before an upgrade, or from another installation).
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

PACKAGES = ("locod", "locod.daemon", "locod.policy")


def code_digest() -> str | None:
    """The SHA-256 (16 hex digits) of the packages' ``*.py`` files, names and bytes; None when one cannot be
    read (an upgrade replacing them now)."""
    digest = hashlib.sha256()
    try:
        for package in PACKAGES:
            spec = importlib.util.find_spec(package)
            assert spec is not None and spec.submodule_search_locations is not None
            folder = Path(next(iter(spec.submodule_search_locations)))
            for path in sorted(folder.glob("*.py")):
                digest.update(f"{package}.{path.stem}\0{path.stat().st_size}\0".encode())
                digest.update(path.read_bytes())
    except OSError:
        return None
    return digest.hexdigest()[:16]
