"""Who may use the tcp endpoint: with a secret (daemon.tcp_secret_file), whoever sends it; without one,
every local user, but only for what exposes none of the owner's records and changes nothing.

The ipc socket needs none of this: its file is the owner's alone. tcpguard.py bounds the connections
themselves; a request that passes here vouches for its connection there.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from locod.protocol import BadRequest, ChatRequest, Request, leading_fields

# How a user of locod's own client gives the tcp secret, said with each refusal for the want of it.
SECRET_HINT = "the one in daemon.tcp_secret_file; locod's CLI sends it with --secret-file FILE or $LOCOD_SECRET"
# A tcp message that does not begin with its secret is parsed (then checked) only up to this size.
UNAUTHENTICATED_BYTES = 64 << 10
# What a tcp endpoint without a secret serves: any local user can reach it, not only the daemon's owner,
# so not the owner's records (`decisions`) nor what changes the daemon (`feedback`, `reload`). `config`
# holds no secret, and the client reads its limits from it before sending a large chat.
OPEN_TCP_OPS = ("chat", "ping", "status", "config")


@dataclass(frozen=True)
class TcpAuth:
    """The tcp endpoint's checks, with its secret as last read (a reload reads a rotated one)."""

    secret: str | None

    def check_head(self, frames: list[bytes]) -> None:
        """The secret, checked before the message is parsed: a message that begins with it (as locod's
        client writes it) is checked at the cost of reading its first bytes; one that does not is parsed
        (and checked after) only when it is small. So a client without the secret costs the loop next to
        nothing, however large what it sends."""
        if self.secret is None:
            return
        raw = frames[0] if len(frames) == 1 else b""
        head = leading_fields(raw)
        given = head.get("secret")
        if given is None and len(raw) <= UNAUTHENTICATED_BYTES:
            return
        if not self._is_secret(given):
            raise BadRequest(
                "this tcp endpoint needs the shared secret in field 'secret', first in the message when it is "
                f"over {UNAUTHENTICATED_BYTES} bytes ({SECRET_HINT})",
                code="unauthorized",
                request_id=head.get("id"),
            )

    def check(self, request: Request) -> None:
        """A parsed request: its secret when the endpoint has one, else only what it serves without."""
        if self.secret is not None and not self._is_secret(request.secret):
            raise BadRequest(
                f"this tcp endpoint needs the shared secret in field 'secret' ({SECRET_HINT})",
                code="unauthorized",
                request_id=request.id,
            )
        refused = _refused_without_secret(request) if self.secret is None else None
        if refused:
            raise BadRequest(
                f"{refused} on a tcp endpoint without a secret (any local user can reach it): use the ipc "
                "socket, or set daemon.tcp_secret_file",
                code="unauthorized",
                request_id=request.id,
            )

    def _is_secret(self, given: str | None) -> bool:
        """Whether ``given`` is the secret, compared in constant time."""
        assert self.secret is not None
        return given is not None and hmac.compare_digest(given.encode(errors="surrogatepass"), self.secret.encode())


def _refused_without_secret(request: Request) -> str | None:
    """What a tcp endpoint without a secret does not serve, said, or None: the owner's records and what
    changes the daemon (OPEN_TCP_OPS), and attachments by path, which the daemon would read as its owner."""
    if request.op not in OPEN_TCP_OPS:
        return f"op {request.op!r} is not served"
    if isinstance(request, ChatRequest) and any(a.path is not None for a in request.attachments):
        return "attachments by path are not read (the daemon would read them as its owner; send their bytes)"
    return None
