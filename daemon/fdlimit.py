"""File descriptors: the daemon takes all the process may have, and keeps the HTTP door well inside them.

libzmq aborts the process when its ipc listener cannot accept for want of a descriptor, so running out is
a crash, not a refused connection. The soft ``RLIMIT_NOFILE`` (often 1024) is raised to the hard one at
start. Each door gets a share of them: the HTTP API and the tcp endpoint, where clients without a key can
open descriptors in numbers, at most half and a quarter; the ipc socket, its owner's alone, an eighth (a
script that leaks clients opens them in numbers too); the rest stays for SQLite, models and attachments.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

CEILING = 1 << 20  # a soft limit to ask for when the hard one is unlimited


def raise_soft_limit() -> int:
    """Raise the soft limit on open descriptors to the hard one; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as exc:  # a container's own ceiling (nr_open): keep what we have
            log.debug("cannot raise the open-file limit to %d: %s", want, exc)
    return CEILING if soft == resource.RLIM_INFINITY else soft


HTTP_SHARE, TCP_SHARE, IPC_SHARE = 0.5, 0.25, 0.125  # of the open-file limit, at most, for each door's connections


def door_share(key: str, requested: int, soft_limit: int, fraction: float) -> int:
    """How many connections a door may hold at once: ``key``'s configured number, but never over its
    ``fraction`` of the open-file limit, so the ipc socket and the daemon's own files always find one."""
    share = max(1, min(requested, int(soft_limit * fraction)))
    if share < requested:
        log.warning(
            "%s is %d, over %d%% of the open-file limit (%d): using %d",
            key,
            requested,
            fraction * 100,
            soft_limit,
            share,
        )
    return share
