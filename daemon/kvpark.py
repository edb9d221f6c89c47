"""Dialogue KV states parked on disk, so a restart or an evicted dialogue resumes without re-reading it.

One file per (model, session) under ``<state_dir>/kvcache``, named by a hash (session ids are client
text). A file carries a checksum and the identity of the model that made it; a file that fails either
check is deleted with one log line and the turn simply reads its prompt. A file is read only if it is a
regular file, not a symlink, no larger than the park's limit (nothing larger is ever written): a FIFO
there would otherwise hold the turn, and with it the local model, for good; ``/dev/zero`` or a huge file
would fill the memory. The folder is kept under its
byte limit by deleting the least recently written files.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from locod.daemon.logs import Throttle
from locod.daemon.regular_file import create_anew, read_regular

log = logging.getLogger(__name__)

MAGIC = b"LOCODKV1"
HEADER = struct.Struct("<8sI")  # magic, length of the JSON header that follows


@dataclass
class SavedState:
    """One dialogue's KV state: the tokens it holds and llama.cpp's serialised sequence."""

    tokens: np.ndarray  # intc
    data: np.ndarray  # uint8

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.tokens.nbytes


class DiskPark:
    def __init__(self, directory: Path, limit_bytes: int) -> None:
        self.directory = directory
        self.limit_bytes = limit_bytes
        self._said_too_large = False  # a state larger than the whole park is said once, not at each eviction
        # A failing write (a full disk) fails every eviction after it: said once an interval, not once a turn.
        self._failures = Throttle(log)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in directory.glob("*.tmp"):  # a daemon killed mid-write: outside the limit's count for good
            with contextlib.suppress(OSError):
                stale.unlink()

    @classmethod
    def opened(cls, directory: Path, limit_bytes: int) -> DiskPark | None:
        """The park, or None with one log line when its folder cannot be made (a file in its place): a
        start refused for it would be retried by systemd for ever, and the park only saves re-reading."""
        try:
            return cls(directory, limit_bytes)
        except OSError as exc:
            log.error("cannot park dialogue states in %s: %s; serving without the disk park", directory, exc.strerror)
            return None

    def _path(self, model: str, session: str) -> Path:
        return self.directory / (hashlib.sha256(f"{model}\0{session}".encode()).hexdigest()[:32] + ".kv")

    def put(self, model: str, session: str, identity: str, state: SavedState) -> None:
        """Write atomically (temp file, rename), then trim the folder to its limit. A file larger than the
        limit is not written: the trim would delete every other parked state, then it."""
        if state.nbytes > self.limit_bytes:  # too large whatever its header: not hashed for nothing
            self._too_large(state.nbytes)
            return
        tokens = state.tokens.astype("<i4").tobytes()
        digest = hashlib.sha256(tokens)
        digest.update(state.data.data)
        meta = json.dumps(
            {"identity": identity, "tokens": len(state.tokens), "data": state.data.size, "sha256": digest.hexdigest()}
        ).encode()
        if HEADER.size + len(meta) + state.nbytes > self.limit_bytes:
            self._too_large(HEADER.size + len(meta) + state.nbytes)
            return
        path = self._path(model, session)
        tmp = path.with_suffix(".tmp")
        try:
            with create_anew(tmp) as f:  # a FIFO there would hold the turn, and the local model, for good
                f.write(HEADER.pack(MAGIC, len(meta)))
                f.write(meta)
                f.write(tokens)
                f.write(state.data.data)
            os.replace(tmp, path)
        except OSError as exc:
            self._failures.say(
                str(exc.strerror),
                logging.WARNING,
                "could not park a dialogue's KV state in %s: %s: %s; until one can be, a dialogue evicted from memory "
                "reads its history again at its next turn (free space there, or set local.cache_disk_mb = 0)",
                self.directory,
                tmp.name,
                exc.strerror,
            )
            with contextlib.suppress(OSError):  # a directory there, which ``create_anew`` refused, stays
                tmp.unlink(missing_ok=True)
            return
        self._trim()

    def _too_large(self, size: int) -> None:
        if not self._said_too_large:
            self._said_too_large = True
            log.warning(
                "a dialogue's KV state (%.1f MiB) is larger than local.cache_disk_mb (%d MiB): states this large "
                "are not parked",
                size / 2**20,
                self.limit_bytes >> 20,
            )

    def take(self, model: str, session: str, identity: str) -> SavedState | None:
        """The parked state (its file removed: the live context holds it from now on), or None."""
        path = self._path(model, session)
        try:
            raw = read_regular(path, self.limit_bytes, follow=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            why = "a symlink" if exc.errno == errno.ELOOP else exc.strerror
            try:
                path.unlink(missing_ok=True)
            except OSError:  # a directory stays: it is not ours to remove
                log.warning("ignoring parked KV state %s: %s; left in place", path.name, why)
            else:
                log.warning("ignoring parked KV state %s: %s; removed", path.name, why)
            return None
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:  # a read-only folder: the state is used all the same, and may be read again later
            log.warning("could not remove parked KV state %s once read: %s", path.name, exc.strerror)
        state = _decode(raw, identity)
        if isinstance(state, str):
            log.warning("ignoring parked KV state %s: %s", path.name, state)
            return None
        return state

    def usage(self) -> tuple[int, int]:
        """(files, bytes) parked now."""
        files = self._files()
        return len(files), sum(size for _, size, _ in files)

    def _files(self) -> list[tuple[Path, int, float]]:
        found = []
        for path in self.directory.glob("*.kv"):
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):  # only what ``put`` writes: a directory there is not ours to trim
                found.append((path, st.st_size, st.st_mtime))
        return found

    def _trim(self) -> None:
        """Delete the least recently written files until the rest fit the limit. A file dated after now was
        written while the clock ran ahead: it goes first, as kept for "newest" it would have every dialogue
        parked after the clock's correction deleted in its place."""
        now = time.time()
        files = sorted(self._files(), key=lambda f: f[2] if f[2] <= now else float("-inf"))
        total = sum(size for _, size, _ in files)
        for path, size, _ in files:
            if total <= self.limit_bytes:
                break
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not trim parked KV state %s: %s", path.name, exc.strerror)
            total -= size


def _decode(raw: bytes, identity: str) -> SavedState | str:
    """The state in a parked file, or why it cannot be used."""
    if len(raw) < HEADER.size:
        return "truncated"
    magic, meta_len = HEADER.unpack_from(raw)
    if magic != MAGIC:
        return "not a locod KV file"
    try:
        meta = json.loads(raw[HEADER.size : HEADER.size + meta_len])
        n_tokens, n_data, expected = int(meta["tokens"]), int(meta["data"]), str(meta["sha256"])
    except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: JSON nested thousands deep
        return "unreadable header"
    if meta.get("identity") != identity:
        return "made by another model or llama.cpp build"
    start = HEADER.size + meta_len
    if len(raw) != start + 4 * n_tokens + n_data:
        return "truncated"
    digest = hashlib.sha256(raw[start:])
    if digest.hexdigest() != expected:
        return "checksum mismatch"
    tokens = np.frombuffer(raw, dtype="<i4", count=n_tokens, offset=start).astype(np.intc)
    return SavedState(tokens, np.frombuffer(raw, dtype=np.uint8, offset=start + 4 * n_tokens))
