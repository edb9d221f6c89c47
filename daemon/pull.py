"""``locod models pull``: download a GGUF the user names, check it, install it, register it.

SOURCE is an http(s) URL or ``hf://owner/repo/file.gguf`` (resolved against ``local.hub_endpoint``; the hub's
LFS SHA-256 is checked without the user typing it). Bytes go to ``.<file>.partial`` beside the models
(``download.py``, which resumes an interrupted download). Only a file that parses as a GGUF, reaches its last
tensor's data and matches the expected SHA-256 is renamed into place, so the daemon never sees a half-written
model.
The daemon never calls this module: downloads happen only when the user runs ``pull``.
"""

from __future__ import annotations

import math
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from locod.daemon import catalog, gguf
from locod.daemon.config import EMBEDDED_MODEL, NAME_A_GGUF, ROUTED_MODEL, Config
from locod.daemon.download import (
    DEFAULT_MAX_BYTES,
    HEADERS,
    MOST_MAX_BYTES,
    TIMEOUT_S,
    MeterFactory,
    download,
    silent,
    status_said,
)
from locod.daemon.fetch import Progress, make_models_dir
from locod.daemon.modelfile import resolve_path
from locod.daemon.regular_file import replace_on_disk
from locod.errors import FetchError

# The context a pulled model is loaded with unless --ctx says otherwise: its trained context, capped, since
# the KV cache of a 128k-token context alone would not fit most edge devices.
MAX_DEFAULT_CTX = 4096
MIN_CTX, MAX_CTX = 128, 1 << 20  # local.models' n_ctx range
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Source:
    given: str  # as the user typed it
    url: str
    filename: str
    sha256: str | None  # published by the hub, None where it publishes none


def resolve(source: str, hub: str) -> Source:
    """Turn SOURCE into a download URL; for ``hf://`` ask the hub for the file's published SHA-256."""
    if source.startswith("hf://"):
        parts = source[len("hf://") :].split("/")
        if len(parts) < 3 or not all(parts):
            raise FetchError(f"{source!r}: expected hf://owner/repo/path/to/file.gguf")
        url = f"{hub}/{parts[0]}/{parts[1]}/resolve/main/{quote('/'.join(parts[2:]))}"
        return Source(source, url, parts[-1], _published_sha256(url))
    if source.startswith(("http://", "https://")):
        filename = unquote(Path(urlsplit(source).path).name)
        if not filename:
            raise FetchError(f"{source!r}: the URL names no file")
        return Source(source, source, filename, None)
    if source.startswith(("file://", "/", "~", ".")) or source.lower().endswith(".gguf"):  # a file on disk
        raise FetchError(
            f"{source!r}: pull downloads (an http(s) URL or hf://owner/repo/file.gguf); a GGUF already on disk "
            f"needs no pull: {NAME_A_GGUF}"
        )
    raise FetchError(f"{source!r}: expected an http(s) URL or hf://owner/repo/file.gguf")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # urllib then raises the 3xx as an HTTPError, whose headers we want


def _published_sha256(url: str) -> str | None:
    """The hub answers HEAD on ``resolve/`` with a redirect whose ``X-Linked-Etag`` is the LFS SHA-256."""
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, method="HEAD", headers=HEADERS), timeout=TIMEOUT_S) as r:
            headers = r.headers
    except urllib.error.HTTPError as exc:
        if not 300 <= exc.code < 400:
            raise FetchError(f"{url}: the hub answered {status_said(exc)}") from None
        headers = exc.headers
    except (urllib.error.URLError, OSError) as exc:
        raise FetchError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None
    tag = (headers.get("X-Linked-Etag") or "").removeprefix("W/").strip('"')
    return tag.lower() if re.fullmatch(r"[0-9a-fA-F]{64}", tag) else None


def pull_model(
    config: Config,
    source: str,
    *,
    name: str | None = None,
    sha256: str | None = None,
    n_ctx: int | None = None,
    meter: MeterFactory = silent,
    progress: Progress = print,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> catalog.PulledModel:
    """Download, check, install and register SOURCE as model ``name`` (default: the file's name)."""
    models_dir = config.models_dir
    if n_ctx is not None:
        context_size(n_ctx)
    found = resolve(source, config.local.hub_endpoint)
    name = name or found.filename.removesuffix(".gguf").lower()
    expected = _expected_sha256(found, sha256)
    pulled = {m.name: m for m in catalog.pulled_models(models_dir)}
    existing = pulled.get(name)
    if existing is not None and existing.origin == source and (models_dir / existing.file).is_file():
        progress(f"{name}: already pulled, at {models_dir / existing.file}")
        return existing
    target = _target(config, name, source, pulled)
    make_models_dir(models_dir)
    partial = models_dir / f".{target.name}.partial"
    progress(f"{name}: downloading {found.url}")
    digest = download(found.url, partial, meter, max_bytes)
    try:
        info = _verify(partial, digest, expected, source)
    except FetchError:
        partial.unlink(missing_ok=True)
        raise
    replace_on_disk(partial, target)  # before the catalog names it: a power cut never leaves the entry alone
    context = info.context_length or 0
    model = catalog.PulledModel(
        name=name,
        file=target.name,
        size=target.stat().st_size,
        sha256=digest,
        origin=source,
        quantisation=info.quantisation,
        context_length=context,
        n_ctx=n_ctx or min(context or MAX_DEFAULT_CTX, MAX_DEFAULT_CTX),
        pulled=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    catalog.register(models_dir, model)
    # What it will take of local.memory_budget_mb, so that a small device's owner can pick --ctx now.
    memory_mb = (model.size + gguf.kv_bytes_per_token(gguf.read_metadata(target)) * model.n_ctx) / 2**20
    progress(
        f"{name}: installed at {target} ({info.quantisation}, context {model.n_ctx} of {context or '?'}; "
        f"it takes about {memory_mb:.0f} MiB in memory with its KV cache at that context)"
    )
    if expected is None:  # a plain URL: only the GGUF header was checked, which a tampered file passes
        progress(
            f"{name}: its SHA-256 is {digest}, not checked: the source publishes none; compare it with the "
            "publisher's, or give it with --sha256 to have it checked"
        )
    return model


def parse_size(text: str) -> int:
    """Bytes in a size the user typed: a number with an optional K, M, G or T (binary units), e.g. ``80G``."""
    # Stripped first: a pattern with a \s* on both sides of its optional unit tried every split of a long run of
    # spaces between them, quadratic in the length typed.
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)i?B?", text.strip(), re.IGNORECASE)
    if not match:
        raise FetchError(f"--max-size expects a size such as 8G or 500M, got {text!r}")
    scaled = float(match.group(1)) * 1024 ** " KMGT".index(match.group(2).upper() or " ")
    if not math.isfinite(scaled):  # over 308 digits: int() of it ended the command in a traceback
        raise FetchError(f"--max-size is more than any disk holds, got {text[:40]!r}...")
    size = int(scaled)
    if not 0 < size <= MOST_MAX_BYTES:
        raise FetchError(
            f"--max-size must be more than 0 and at most 2T (over the largest model file there is), got {text!r}"
        )
    return size


def context_size(n_ctx: int) -> int:
    """``--ctx``: the context a pulled model is loaded with, in local.models' n_ctx range."""
    if not MIN_CTX <= n_ctx <= MAX_CTX:
        raise FetchError(f"--ctx must be between {MIN_CTX} and {MAX_CTX}, got {n_ctx}")
    return n_ctx


def sha256_given(text: str) -> str:
    """``--sha256``: a SHA-256 as the user typed it, in lower case."""
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise FetchError(f"--sha256 expects 64 hex digits, got {text!r}")
    return text.lower()


def model_name(name: str) -> str:
    """A pulled model's name (``--name``, or the file's): one the config and the OpenAI door can take."""
    if not NAME_PATTERN.fullmatch(name):
        raise FetchError(f"model name {name!r}: use letters, digits, '.', '_' and '-' (choose one with --name)")
    if name == ROUTED_MODEL:  # registered, it would stop every start of the daemon (config.py refuses it)
        raise FetchError(f"model name {name!r} means 'let locod route' to OpenAI clients; choose another --name")
    return name


def _expected_sha256(found: Source, given: str | None) -> str | None:
    given = sha256_given(given) if given is not None else None
    if given and found.sha256 and given != found.sha256:
        raise FetchError(f"--sha256 {given} differs from the hub's published {found.sha256}; nothing downloaded")
    return given or found.sha256


def _target(config: Config, name: str, source: str, pulled: dict[str, catalog.PulledModel]) -> Path:
    """Where model ``name`` goes; refuses a name or file that belongs to another model."""
    model_name(name)
    existing = pulled.get(name)
    if existing is not None and existing.origin != source:
        raise FetchError(
            f"a model named {name!r} is already pulled (from {existing.origin}); "
            f"`locod models rm {name}` first, or choose another --name"
        )
    configured = [m for m in config.local.models if m.name not in pulled] + config.cloud.models
    if any(m.name == name for m in configured):
        raise FetchError(f"{name!r} is already a model in {config.source}; choose another --name")
    target = config.models_dir / f"{name}.gguf"
    for model in config.local.models:
        if model.name != name and resolve_path(model, config.models_dir) == target:
            raise FetchError(f"{target} is the file of model {model.name!r}; choose another --name")
    return target


def _verify(partial: Path, digest: str, expected: str | None, source: str) -> gguf.GgufInfo:
    """The header, and that the file reaches its last tensor's data: a server that sent part of a model (a
    broken mirror, an upload cut short) gave a file whose header passed, and without a published SHA-256 it
    was installed, loaded by nothing and listed as `cut short` only afterwards."""
    try:
        info = gguf.summary(gguf.check_whole(partial))
    except gguf.CutShort:
        raise FetchError(
            f"{source}: the download is a GGUF cut short (it ends before its last tensor's data: the server "
            "sent part of the model); it was removed"
        ) from None
    except gguf.NotGGUF:
        raise FetchError(f"{source}: the download is not a GGUF model file; it was removed") from None
    if expected and digest != expected:
        raise FetchError(
            f"{source}: checksum mismatch (got sha256 {digest}, expected {expected}); the download was removed"
        )
    return info


def remove_model(config: Config, name: str) -> Path:
    """Unregister a pulled model and delete its file (and any partial download); returns the file's path."""
    pulled = {m.name: m for m in catalog.pulled_models(config.models_dir)}
    if name not in pulled:
        configured = any(m.name == name for m in config.local.models)
        where = "no such model"
        if name == EMBEDDED_MODEL.name:
            where = "it is locod's built-in default model, which `locod models rm` keeps"
        elif configured:
            where = f"it is configured in {config.source}; remove it from that file"
        raise FetchError(f"{name!r} was not pulled: {where}")
    if config.local.default == name:
        raise FetchError(f"{name!r} is local.default in {config.source}; choose another default first")
    model = catalog.unregister(config.models_dir, name)
    assert model is not None
    path = config.models_dir / model.file
    path.unlink(missing_ok=True)
    (config.models_dir / f".{model.file}.partial").unlink(missing_ok=True)
    return path
