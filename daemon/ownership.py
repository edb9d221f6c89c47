"""The daemon's own directories must be its own: nobody else may own them or write into them.

Without ``XDG_RUNTIME_DIR`` the socket lives under ``/tmp/locod-$UID/``, a name any local user can create
first; a daemon that served there would hand the squatter its clients' prompts. So a directory is
refused unless the daemon's user owns it and nobody else can write to it, and its parent too (a parent
may also be root's, and world-writable only if sticky, as /tmp is).
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

from locod.errors import StorageError

OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


def make_private_dir(directory: Path) -> None:
    """Create ``directory`` (0700) if needed and check it and its parent; StorageError if unsafe."""
    uid = os.geteuid()
    try:
        directory.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _check_parent(directory.parent, os.stat(directory.parent), uid)
        directory.mkdir(exist_ok=True, mode=0o700)
        info = os.lstat(directory)
    except OSError as exc:
        raise unwritable(directory, exc) from None
    if stat.S_ISLNK(info.st_mode):  # whoever can change where it points owns what is kept there
        # Said with its fix: "fix its owner or mode" does nothing for a link to a bigger disk (a Jetson's
        # ~/.local/state/locod on its NVMe), where naming the directory itself does.
        raise StorageError(
            f"refusing {directory}: it is a symlink (to {os.readlink(directory)}), not a directory; whoever could "
            f"change where it points would own what the daemon keeps there: name the directory itself "
            f"({os.path.realpath(directory)}) in paths.state_dir or paths.runtime_dir ($LOCOD_STATE_DIR, "
            "$LOCOD_RUNTIME_DIR)",
            code="unsafe_directory",
        )
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid:
        raise _unsafe(directory, "is not a directory owned by this user", info)
    try:
        os.chmod(directory, 0o700)
    except OSError as exc:
        raise unwritable(directory, exc) from None


def unwritable(directory: Path, exc: OSError) -> StorageError:
    """The error for a directory the daemon cannot make or write: a read-only mount, a home it may not write
    (a service user's /nonexistent), said with where to put it instead."""
    return StorageError(
        f"cannot use {directory}: {exc.strerror}; set paths.state_dir and paths.runtime_dir ($LOCOD_STATE_DIR, "
        "$LOCOD_RUNTIME_DIR) to a directory this user may write",
        code="state_unwritable",
    )


def _check_parent(parent: Path, info: os.stat_result, uid: int) -> None:
    if info.st_uid not in (uid, 0):
        raise _unsafe(parent, "is owned by another user", info)
    if info.st_mode & OTHERS_WRITE and not (info.st_uid == 0 and info.st_mode & stat.S_ISVTX):
        raise _unsafe(parent, "is writable by others", info)


def _unsafe(path: Path, why: str, info: os.stat_result) -> StorageError:
    return StorageError(
        f"refusing {path}: it {why} (owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):o}); "
        "another user could read or replace what the daemon keeps there: fix its owner or mode, or set "
        "paths.state_dir and paths.runtime_dir ($LOCOD_STATE_DIR, $LOCOD_RUNTIME_DIR) to a directory of your own",
        code="unsafe_directory",
    )


def closed_to_this_user(path: Path) -> tuple[str, str]:
    """What keeps ``path`` from this user, said as "DIR belongs to OWNER (mode M)", and that owner: the
    nearest directory above it this user can stat is the one it may not search (the root always stats)."""
    closed, info = next((d, info) for d in path.parents if (info := _stat(d)) is not None)
    owner = user_name(info.st_uid)
    return f"{closed} belongs to {owner} (mode {info.st_mode & 0o7777:o})", owner


def user_name(uid: int) -> str:
    """The user ``uid`` as ``sudo -u`` takes it: the name, or ``#uid`` for one without a name."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"#{uid}"


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None
