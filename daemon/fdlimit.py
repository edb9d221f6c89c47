"""File descriptors: the daemon takes all the process may have, and keeps the HTTP door well inside them.

libzmq aborts the process when its ipc listener cannot accept for want of a descriptor, so running out is
a crash, not a refused connection. The soft ``RLIMIT_NOFILE`` (often 1024) is raised to the hard one at
start, and the HTTP door, the one place clients without a key can open descriptors in numbers, may hold
at most half of them: the other half stays for the ZeroMQ sockets, SQLite, models and attachments.
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


def http_share(requested: int, soft_limit: int) -> int:
    """How many HTTP connections may be open at once: as configured, but never over half the limit."""
    share = max(1, min(requested, soft_limit // 2))
    if share < requested:
        log.warning(
            "http.max_connections is %d, over half the open-file limit (%d): using %d, so that the ZeroMQ "
            "sockets always find a descriptor",
            requested,
            soft_limit,
            share,
        )
    return share
