"""The decision log's three files (``locod.db``, its ``-wal`` and ``-shm``) as the daemon's connections share
them, watched at each write for what another program did to them (daemon/records.py says what it means).

Each write looks at them twice, so the looks are cheap: descriptors kept open and read with ``os.pread``
instead of a file opened and closed each time, and each file's identity stat'ed once a write. The
descriptors on ``locod.db`` and ``-shm`` are closed only once SQLite's connections are: closing any
descriptor of a file drops every POSIX lock this process holds on it, SQLite's included.
"""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path

WAL_MAGIC = (0x377F0682, 0x377F0683)  # a WAL file's first four bytes, big-endian
HEADER_BYTES = 100  # locod.db's header (sqlite.org/fileformat2.html): page count, freelist, schema cookie
# Of the -shm file's wal-index (sqlite.org/walformat.html), the bytes a checkpoint changes and nothing else
# does (not a commit, nor a read): its header's salt, which a WAL restart changes, and the checkpoint info's
# nBackfill and nBackfillAttempted, which a checkpoint sets before it writes.
CHECKPOINT_MARK = (slice(32, 40), slice(96, 100), slice(128, 132))


class LogFiles:
    """The files of the log at ``path``, from the writer's first write on (before, nothing is known of the
    -wal and -shm files, and each check passes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.wal_path, self.shm_path = Path(f"{path}-wal"), Path(f"{path}-shm")
        self.opened = file_identity(path)  # the file the writer writes
        self.wal: tuple[int, int] | None = None  # the -wal file's identity
        self.shm: tuple[int, int] | None = None  # the -shm file's: the WAL's index the connections share
        self._fds: dict[Path, int] = {}  # read-only descriptors on the three files
        # locod.db as the last write left it: its mtime, the -shm file's checkpoint bytes and its header
        self._seen: tuple[int, bytes, bytes] | None = None

    def know(self) -> None:
        """After a write (the first one: the -wal and -shm files are there now), know the files by identity
        and keep a descriptor on each; once known, they are never opened again."""
        if self.wal is not None:
            return
        self.wal, self.shm = file_identity(self.wal_path), file_identity(self.shm_path)
        if self.wal is None or self.shm is None:  # not in WAL mode after all: nothing to watch
            return
        with suppress(OSError):  # one not there after all: its looks pass
            for file in (self.wal_path, self.shm_path, self.path):
                self._fds[file] = os.open(file, os.O_RDONLY | os.O_CLOEXEC)

    def wal_intact(self) -> bool:
        """Whether the -wal file starts with SQLite's magic number (sqlite.org/fileformat2.html), or is empty
        (as a TRUNCATE checkpoint leaves it); true before the first write."""
        fd = self._fds.get(self.wal_path)
        if fd is None:
            return True
        head = os.pread(fd, 4, 0)
        return len(head) < 4 or int.from_bytes(head, "big") in WAL_MAGIC

    def wal_size(self) -> int | None:
        fd = self._fds.get(self.wal_path)
        return None if fd is None else os.fstat(fd).st_size

    def changed(self) -> str | None:
        """Which file is no longer at its path (removed, or another put there): "wal" or "db"; else
        "rewritten" when locod.db was written in place by something other than SQLite; else None."""
        if self.wal is not None and file_identity(self.wal_path) != self.wal:
            return "wal"
        try:
            st = os.stat(self.path)
        except OSError:
            return "db"
        if (st.st_dev, st.st_ino) != self.opened:
            return "db"
        return "rewritten" if self._rewritten(st.st_mtime_ns) else None

    def _rewritten(self, mtime_ns: int) -> bool:
        """Whether locod.db was written since the last write with no checkpoint meanwhile (a backup restored
        over it with ``cp``, same inode): SQLite writes the file only in a checkpoint, and a checkpoint marks
        the -shm file before it writes. Its header compared: a ``touch`` changes the time alone."""
        if self._seen is None or mtime_ns == self._seen[0]:
            return False
        _, seen_checkpoint, seen_header = self._seen
        if self._checkpoint_mark() != seen_checkpoint:
            return False  # checkpointed: the next write notes it
        if self._read(self.path, HEADER_BYTES) != seen_header:
            return True
        self._seen = (mtime_ns, seen_checkpoint, seen_header)
        return False

    def note_written(self) -> None:
        """After a write: locod.db as it left it, what ``_rewritten`` compares the next look with. Its time and
        header are read again only when a checkpoint may have written it (the -shm file's mark changed)."""
        if len(self._fds) < 3:
            return
        checkpoint = self._checkpoint_mark()
        if self._seen is not None and checkpoint == self._seen[1]:
            return
        mtime = os.fstat(self._fds[self.path]).st_mtime_ns
        header = self._seen[2] if self._seen is not None and self._seen[0] == mtime else None
        self._seen = (mtime, checkpoint, header or self._read(self.path, HEADER_BYTES))

    def _checkpoint_mark(self) -> bytes:
        wal_index = self._read(self.shm_path, CHECKPOINT_MARK[-1].stop)
        return b"".join(wal_index[part] for part in CHECKPOINT_MARK)

    def _read(self, file: Path, size: int) -> bytes:
        return os.pread(self._fds[file], size, 0)

    def close(self) -> None:
        """After SQLite's connections are closed (the module's docstring says why)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path``; None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
