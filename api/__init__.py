"""locod: a local-cloud LLM daemon for edge devices.

The public surface is the client (``locod.Client``) and the error tree (``locod.errors``); the daemon
lives in ``locod.daemon`` and everything learned (routing, policy) in ``locod.policy``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from locod.errors import LocodError

__version__ = "0.1.0"

if TYPE_CHECKING:
    from locod.client import Client, TurnResult


def __getattr__(name: str) -> Any:
    """``locod.Client`` and ``locod.TurnResult``, imported on first use: the client imports pyzmq, which the
    ``locod`` command needs only when it talks to the daemon (``locod --help`` reads no socket)."""
    if name in ("Client", "TurnResult"):
        from locod import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Client", "LocodError", "TurnResult", "__version__"]
