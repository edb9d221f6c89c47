"""The daemon's size limits, checked by the client before a large request is sent.

Attachments travel base64-encoded inside the request's one frame. The daemon answers a frame over
``daemon.max_message_bytes`` with ``too_large``, but ZeroMQ drops one over twice that (``ZMQ_MAXMSGSIZE``,
daemon/server.py) before the daemon sees it: no reply can come, and the client would wait out its whole
timeout and then suspect a stopped daemon. So a request that could be dropped is measured against the
running daemon's configuration first, and refused here with the file and the key that decide.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from locod.errors import AttachmentError, ProtocolError
from locod.protocol import Attachment

# The smallest frame ZeroMQ may drop: twice the least max_message_bytes the daemon accepts (1024), plus the
# slack daemon/server.py adds. A request up to this size always reaches the daemon, which answers it.
ALWAYS_READ_BYTES = 2 * 1024 + 4096
# The largest frame a client reads (ZeroMQ's MAXMSGSIZE on its socket): what daemon.max_message_bytes may be at
# most. The daemon's own frames are far smaller (an answer within cloud.max_answer_bytes, a page of at most 1000
# records); without it, whatever answered at the endpoint (a port taken by another program) could send a frame
# as large as the client's memory. ZeroMQ closes the connection on a larger one, unread.
MAX_REPLY_BYTES = 1 << 30


def check_request_size(size: int, attachments: Sequence[Attachment], config: Mapping[str, Any]) -> None:
    """Raise what the daemon would say (or could not say) about a request of ``size`` bytes; ``config`` is
    the running daemon's (the ``config`` op)."""
    per_file = int(config["attachments"]["max_bytes"])
    for attachment in attachments:
        if attachment.data is not None and len(attachment.data) > per_file:
            raise AttachmentError(
                f"attachment {attachment.name!r} is {len(attachment.data)} bytes, over the daemon's limit of "
                f"{per_file} (attachments.max_bytes)",
                code="attachment_too_large",
            )
    limit = int(config["daemon"]["max_message_bytes"])
    if size > limit:
        sizes = ", ".join(f"{a.name!r} {len(a.data)} bytes" for a in attachments if a.data is not None)
        carried = f" (attachments travel inside it, base64-encoded: {sizes})" if sizes else ""
        raise ProtocolError(
            f"the request is {size} bytes{carried}, over the daemon's limit of {limit} (daemon.max_message_bytes)",
            code="too_large",
        )
