"""Reading a file a client named by path, without being raced or wedged.

Checking a path and then opening it is a race: between the two, a component can be swapped for a symlink
that leads outside the allowed directories. So the path is never resolved and then trusted. Each
component below an allowed directory is opened relative to the one before it with ``O_NOFOLLOW`` (a
symlink anywhere under the allowed directory is refused, not followed), the file itself non-blocking (a
FIFO cannot hold the thread in ``open``), and what was opened is checked, not what was named: a regular
file (``fstat``), of bounded size, whose ``/proc/self/fd`` path lies under an allowed directory.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from locod.errors import AttachmentError

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def read_allowed(path: str, allow_dirs: list[str], max_bytes: int, name: str) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``max_bytes`` under an allowed directory."""
    if "\x00" in path:
        raise AttachmentError(f"attachment {name!r}: the path holds a NUL byte", code="bad_path")
    found = _under_allowed(path, allow_dirs)
    if found is None:
        raise _not_allowed(name)
    base, parts = found
    fd = _open_beneath(base, parts, name)
    try:
        return _read_checked(fd, allow_dirs, max_bytes, name)
    finally:
        os.close(fd)


def _not_allowed(name: str, why: str = "path is outside the allowed directories") -> AttachmentError:
    return AttachmentError(f"attachment {name!r}: {why}; send the bytes instead", code="path_not_allowed")


def _under_allowed(path: str, allow_dirs: list[str]) -> tuple[str, list[str]] | None:
    """(allowed directory, components below it) for the first allowed directory the path names, as
    written in the config or with its symlinks resolved; None if it names none. ``..`` is applied to the
    text first, and a path that climbs out of the directory is outside it."""
    target = os.path.normpath(os.path.abspath(path))
    for directory in allow_dirs:
        for base in dict.fromkeys((os.path.abspath(directory), os.path.realpath(directory))):
            if target == base or target.startswith(base.rstrip("/") + "/"):
                parts = [p for p in target[len(base) :].split("/") if p]
                return base, parts
    return None


def _open_beneath(base: str, parts: list[str], name: str) -> int:
    """Open ``base/parts...`` one component at a time, never following a symlink below ``base``."""
    try:
        fd = os.open(base, DIR_FLAGS & ~os.O_NOFOLLOW)  # the allowed directory itself is the user's word
    except OSError as exc:
        raise AttachmentError(f"attachment {name!r}: cannot read: {exc.strerror}") from None
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            next_fd = os.open(part, FILE_FLAGS if last else DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = next_fd
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # a symlink (or a file where a directory should be)
            # "outside the allowed directories" misled for a symlink that points inside them
            why = f"{part!r} is a symlink (not followed here, wherever it points) or no directory"
            raise _not_allowed(name, why) from None
        raise AttachmentError(f"attachment {name!r}: cannot read: {exc.strerror}") from None
    return fd


def over_limit(name: str, max_bytes: int) -> AttachmentError:
    """An attachment over ``attachments.max_bytes``, named with the key that decides, whichever door sent it."""
    return AttachmentError(
        f"attachment {name!r} is over the {max_bytes}-byte limit (attachments.max_bytes)", code="attachment_too_large"
    )


def _read_checked(fd: int, allow_dirs: list[str], max_bytes: int, name: str) -> bytes:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise AttachmentError(
            f"attachment {name!r}: not a regular file (a FIFO, device, socket or directory)", code="bad_path"
        )
    if info.st_size > max_bytes:
        raise over_limit(name, max_bytes)
    opened = _opened_path(fd)
    if opened is not None and not any(
        opened.is_relative_to(Path(d).resolve()) for d in allow_dirs
    ):  # belt and braces: what the kernel says was opened
        raise _not_allowed(name)
    os.set_blocking(fd, True)
    chunks, size = [], 0
    while size <= max_bytes:  # read to the limit, not to st_size: the file may grow meanwhile
        chunk = os.read(fd, min(1 << 20, max_bytes + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _opened_path(fd: int) -> Path | None:
    """The path the kernel holds for an open descriptor, where /proc tells it."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None
