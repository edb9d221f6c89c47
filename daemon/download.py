"""A resumable HTTP download into a partial file, for ``locod models pull``.

Bytes are appended to the partial file; a later call resumes from its length with a Range request (a
server that ignores the range, or answers another one, gets a fresh start). Free space is checked against
the announced length before a byte is written, and no download grows past ``max_bytes`` (a server that
sends no Content-Length could otherwise stream until the disk is full). A dropped connection raises
FetchError and keeps the partial file for the next try; a full disk or a body over ``max_bytes`` raises it
and removes the part (kept, it would leave the disk full, and the daemon sharing it refuses every turn);
a body that does not start as a GGUF is refused after its first bytes and removed.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import logging
import os
import re
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from locod import __version__
from locod.daemon import gguf
from locod.errors import FetchError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
TIMEOUT_S = 30.0
HEADERS = {"User-Agent": f"locod/{__version__}"}
DEFAULT_MAX_BYTES = 64 << 30  # a hub stores one GGUF file in at most 50 GB; `models pull --max-size` raises it
# The most --max-size takes: over the largest model file there is (a 671B model in 16 bits, 1.3 TB). A larger
# bound guarded against nothing, a typo (80T for 80G) leaving a server that never ends its stream the whole disk.
MOST_MAX_BYTES = 2 << 40


class Meter(Protocol):
    """What the download reports bytes to: a tqdm bar fits."""

    def update(self, n: int) -> object: ...

    def close(self) -> None: ...


# Called once the size is known: (total bytes or None, bytes already on disk) -> a meter.
MeterFactory = Callable[[int | None, int], Meter]


class _Silent:
    def update(self, n: int) -> object:
        return None

    def close(self) -> None:
        pass


def silent(total: int | None, initial: int) -> Meter:
    return _Silent()


class _Lines:
    """Progress as a plain line every tenth of the file (or every 100 MiB of one of unknown size): what a
    terminal gets without tqdm."""

    def __init__(self, label: str, total: int | None, initial: int, say: Callable[[str], None]) -> None:
        self.label, self.total, self.have, self.say = label, total, initial, say
        self.step = max(total // 10, CHUNK) if total else 100 * CHUNK
        self.next = initial + self.step

    def update(self, n: int) -> object:
        self.have += n
        if self.have >= self.next:
            self.next = self.have + self.step
            of = f" of {_mb(self.total)} ({100 * self.have // self.total}%)" if self.total else ""
            self.say(f"{self.label}: {_mb(self.have)}{of}")
        return None

    def close(self) -> None:
        pass


def terminal_meter(label: str, say: Callable[[str], None]) -> MeterFactory:
    """On a terminal, a tqdm bar with size, speed and time left, or without tqdm (the pull extra) plain
    progress lines through ``say``; nothing at all when stderr is not a terminal. The bar is never needed."""
    if not sys.stderr.isatty():
        return silent
    try:
        from tqdm import tqdm
    except ImportError:
        return lambda total, initial: _Lines(label, total, initial, say)

    def make(total: int | None, initial: int) -> Meter:
        return tqdm(total=total, initial=initial, desc=label, unit="B", unit_scale=True, unit_divisor=1024)

    return make


def download(url: str, partial: Path, meter: MeterFactory = silent, max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """Fetch ``url`` into ``partial``, resuming from the bytes already there; returns the whole file's SHA-256.

    Raises FetchError, leaving ``partial`` for the next try, when the connection drops; removing it when
    the disk fills or the file would pass ``max_bytes``; a body that does not start as a GGUF is refused
    (and removed) after its first bytes.
    """
    have = partial.stat().st_size if partial.exists() else 0
    response, have = _open(url, have)
    with response:
        remaining = response.length  # None without a Content-Length
        if remaining is not None:
            if have + remaining > max_bytes:
                partial.unlink(missing_ok=True)
                raise FetchError(f"{url}: the file is {_mb(have + remaining)}, over {_too_large(max_bytes)}")
            _check_space(partial.parent, remaining)
        digest = _hash_of(partial, have)
        done = 0
        bar = meter(None if remaining is None else have + remaining, have)
        try:
            with partial.open("r+b" if have else "wb") as out:
                out.seek(have)
                out.truncate()
                while chunk := response.read(CHUNK):
                    if have + done == 0 and not chunk.startswith(gguf.MAGIC[: len(chunk)]):
                        partial.unlink()
                        raise FetchError(f"{url}: the server sent no GGUF file (it starts with {chunk[:16]!r})")
                    if have + done + len(chunk) > max_bytes:
                        out.close()
                        partial.unlink()
                        raise FetchError(
                            f"{url}: the download passed {_too_large(max_bytes)} without its end (the server "
                            "announced no size); the part was removed"
                        )
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    bar.update(len(chunk))
                out.flush()
                os.fsync(out.fileno())
        except (http.client.HTTPException, OSError) as exc:
            raise _interrupted(exc, partial, have + done) from None
        finally:
            bar.close()
    if remaining is not None and done < remaining:
        raise _interrupted(EOFError("the server closed the connection"), partial, have + done)
    return digest.hexdigest()


def status_said(exc: urllib.error.HTTPError) -> str:
    """A refusal's status and reason phrase, which the server writes: up to 64 kB on the status line."""
    reason = str(exc.reason)
    return f"{exc.code} {reason[:80]}{'...' if len(reason) > 80 else ''}"


def _open(url: str, have: int) -> tuple[http.client.HTTPResponse, int]:
    """GET from byte ``have`` on; returns the response and the offset it really starts at."""
    headers = {**HEADERS, "Range": f"bytes={have}-"} if have else HEADERS
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the partial is as long as the file, or longer: start again
            log.info("%s: the server refused to resume at %d bytes; downloading from the start", url, have)
            return _open(url, 0)
        raise FetchError(f"{url}: the server answered {status_said(exc)}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise FetchError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None
    start = 0
    if response.status == 206:
        match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
        start = int(match.group(1)) if match else -1
    if start not in (have, 0):  # not where we asked: start over, once
        response.close()
        if not have:
            raise FetchError(f"{url}: the server answered with a part of the file (from byte {start}) unasked")
        return _open(url, 0)
    return response, start


def _check_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise FetchError(
            f"not enough disk space in {directory}: the download needs {_mb(needed)}, {_mb(free)} is free; "
            "nothing was downloaded"
        )


def _hash_of(partial: Path, length: int) -> Any:
    digest = hashlib.sha256()
    if length:
        with partial.open("rb") as f:
            left = length
            while left and (chunk := f.read(min(CHUNK, left))):
                digest.update(chunk)
                left -= len(chunk)
    return digest


def _too_large(max_bytes: int) -> str:
    return f"the {_mb(max_bytes)} a model may take (--max-size raises it)"


def _interrupted(exc: BaseException, partial: Path, written: int) -> FetchError:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        partial.unlink(missing_ok=True)  # kept, it would leave the disk full
        return FetchError(
            f"the disk filled up after {_mb(written)}; the part was removed: free some space and run the "
            "same command again"
        )
    return FetchError(
        f"download interrupted after {_mb(written)} ({exc}); run the same command again to resume "
        f"(the part is kept as {partial})"
    )


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
