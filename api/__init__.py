"""locod: a local-cloud LLM daemon for edge devices.

The public surface is the client (``locod.Client``) and the error tree (``locod.errors``); the daemon
lives in ``locod.daemon`` and everything learned (routing, policy) in ``locod.policy``.
"""

__version__ = "0.1.0"

from locod.client import Client, TurnResult
from locod.errors import LocodError

__all__ = ["Client", "LocodError", "TurnResult", "__version__"]
