"""Reading a file the daemon itself is configured with (config, key files, the policy) without being wedged.

``open()`` on a FIFO blocks until a writer comes, and the daemon reads these files on its serving loop
(at start, on reload and SIGHUP): one FIFO named as a key file would stop every socket request. So the
file is opened non-blocking, what was opened is checked (``fstat``: a regular file), and at most
``max_bytes`` are read. Errors are OSErrors whose ``strerror`` says the problem, so a caller's existing
``except OSError`` names it. A file the daemon writes (a temp file renamed into place) is made anew
(``create_anew``): opened to write, a FIFO left at its name waits for a reader the same way. State that
must survive a crash is written through ``written_whole`` (temp file, fsync, rename, fsync of the folder);
a file written and fsynced otherwise (a download) takes its name through ``replace_on_disk``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def read_regular(path: str | Path, max_bytes: int, follow: bool = True) -> bytes:
    """The bytes of ``path`` if it is a regular file (symlinks to one are followed unless ``follow`` is
    False: then a symlink is refused, ``ELOOP``) of at most ``max_bytes``."""
    with _opened_regular(path, max_bytes, follow) as fd:
        os.set_blocking(fd, True)
        chunks, size = [], 0
        while size <= max_bytes:  # to the bound, not to st_size: the file may grow meanwhile
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > max_bytes:
            raise OSError(errno.EFBIG, f"over {max_bytes} bytes: not a file of this kind", str(path))
        return b"".join(chunks)


def regular_size(path: str | Path, max_bytes: int) -> int:
    """The size of ``path`` if it is a regular file of at most ``max_bytes``, checked as ``read_regular``
    checks it, for a file another library reads (an ONNX policy's external data, onnxruntime's to load)."""
    with _opened_regular(path, max_bytes, follow=True) as fd:
        return os.fstat(fd).st_size


@contextlib.contextmanager
def _opened_regular(path: str | Path, max_bytes: int, follow: bool) -> Iterator[int]:
    """``path`` opened without blocking (a FIFO would wait for a writer), if it is a regular file of at most
    ``max_bytes``; closed after."""
    fd = os.open(path, FLAGS if follow else FLAGS | os.O_NOFOLLOW)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, device, socket or directory)", str(path))
        if info.st_size > max_bytes:
            raise OSError(errno.EFBIG, f"over {max_bytes} bytes ({info.st_size}): not a file of this kind", str(path))
        yield fd
    finally:
        os.close(fd)


def file_stamp(path: Path | None) -> tuple[int, int] | None:
    """(size, modification time in ns) of ``path``, or None where there is none: what tells a file changed
    since it was last read (a cache of what it says is kept until the stamp moves)."""
    if path is None:
        return None
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_size, info.st_mtime_ns


def create_anew(path: Path, mode: int = 0o600) -> BinaryIO:
    """``path`` made anew for writing (``mode``, less the umask): whatever was there is removed first, never
    written through (a FIFO there held the write for good, a symlink would be followed)."""
    path.unlink(missing_ok=True)
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode), "wb")


@contextlib.contextmanager
def written_whole(path: Path, tmp: Path | None = None, mode: int = 0o600) -> Iterator[BinaryIO]:
    """A file to write ``path``'s new content into, which replaces ``path`` whole or not at all: it is ``tmp``
    (beside it, ``<name>.tmp`` unless given), made anew, and takes the name only once its bytes are on the
    disk (fsync, then rename, the rename synced too: ``replace_on_disk``). A crash, a power loss or a full
    disk mid-write leaves the file that was there, not a damaged one; a half-written ``tmp`` is removed (it
    would only hold the space a full disk lacks). ``mode`` is the new file's (less the umask): 0600, or 0666
    for one another user may read."""
    tmp = tmp or path.with_name(f"{path.name}.tmp")
    try:
        with create_anew(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        replace_on_disk(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a directory there, which ``create_anew`` refused, stays
            tmp.unlink(missing_ok=True)
        raise


def replace_on_disk(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` (its bytes already fsynced) to ``path`` and sync the folder holding both: until the
    folder is synced the rename lives only in memory, and a power cut after the caller went on (a catalog
    naming a model the folder no longer holds, a state or policy the user was told is saved) undoes it.
    Once renamed, the new file is what every reader gets: a folder that cannot be synced after it (an I/O
    error, no descriptor left) is logged, not raised, as a caller told its write failed would act on a file
    that is in place (`models pull` left a model file no catalog entry named). A folder this process may
    write but not read (mode 0300), or a file system that cannot sync a folder, is no fault: the rename is
    done unsynced, as before there was a sync (``models rm`` then kept the file of an entry it had removed)."""
    os.replace(tmp, path)
    try:
        _sync_folder(path.parent)
    except OSError as exc:
        log.warning("%s is written, but its folder could not be synced (%s): a power cut may undo it", path, exc)


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except PermissionError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: a file system that cannot sync a folder; the rename is done
            raise
    finally:
        os.close(fd)
