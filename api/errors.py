"""Every error a locod user can see, in one tree.

Each class carries a stable ``code``; the daemon sends it in ``error`` frames and the client raises the
matching class again, so a caller can catch ``ModelError`` whether it ran in-process or over the socket::

    LocodError
    ├── RequestError            the request itself is wrong (the client should change it)
    │   ├── ProtocolError         not a valid message: bytes, JSON, frames, version, size
    │   ├── AttachmentError       an attachment is unreadable, too large, or not allowed
    │   ├── PromptTooLong         the prompt alone does not fit the model's context
    │   ├── UnknownModel          the request names a model the daemon does not have
    │   └── UnknownDecision       feedback names a decision it cannot find or label (the decisions op: an empty list)
    ├── ModelError              a local model is missing, corrupt, or cannot be loaded
    ├── CloudError              the cloud endpoint failed (usually answered by falling back to local)
    ├── PolicyError             the ONNX routing policy is missing, corrupt or mismatched
    ├── ConfigError             the configuration file or an override is invalid
    ├── FetchError              a model could not be downloaded or failed its checksum
    ├── StorageError            the decision log or a state directory cannot be used (locked, unsafe, full)
    ├── Busy                    the daemon is shutting down or at a limit, the turn was cancelled, or
    │                             (client side, `client_in_use`) another thread is using this Client
    ├── DaemonNotRunning        (client side) nothing answers at the endpoint
    └── UnsafeSocket            (client side) the socket belongs to another user: nothing is sent
"""

from __future__ import annotations

import sys


class LocodError(Exception):
    code = "error"
    decision: int | None = None  # the accepted turn it ended, as its error frame named it (``from_frame``)

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class RequestError(LocodError):
    code = "bad_request"


class ProtocolError(RequestError):
    code = "protocol"


class AttachmentError(RequestError):
    code = "bad_attachment"


class PromptTooLong(RequestError):
    code = "prompt_too_long"


class UnknownModel(RequestError):
    code = "unknown_model"


class UnknownDecision(RequestError):
    code = "unknown_decision"


class ModelError(LocodError):
    code = "model"


class CloudError(LocodError):
    code = "cloud"


class PolicyError(LocodError):
    code = "policy"


class ConfigError(LocodError):
    code = "config"


class FetchError(LocodError):
    code = "fetch"


class StorageError(LocodError):
    code = "storage"


class Busy(LocodError):
    code = "busy"


# Busy's code for a turn whose local model a reload removed while it waited: the same request, sent again, is
# decided anew (the daemon raises it, the HTTP door answers it 503 with Retry-After).
MODEL_RELOADED = "model_reloaded"


class DaemonNotRunning(LocodError):
    code = "not_running"


class UnsafeSocket(LocodError):
    code = "unsafe_socket"


_BY_CODE: dict[str, type[LocodError]] = {
    cls.code: cls
    for cls in (
        LocodError,
        RequestError,
        ProtocolError,
        AttachmentError,
        PromptTooLong,
        UnknownModel,
        UnknownDecision,
        ModelError,
        CloudError,
        PolicyError,
        ConfigError,
        FetchError,
        StorageError,
        Busy,
        DaemonNotRunning,
        UnsafeSocket,
    )
}


def first_line(exc: BaseException, limit: int = 300) -> str:
    """What another library's exception says, on one bounded line, for a LocodError's message: onnxruntime's
    run over several lines and repeat the node, and a GGUF's chat template may raise one of any length."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def install_hint(extra: str) -> str:
    """How to add an optional extra (pyproject.toml) to the environment this locod runs in: pip from that
    environment, in the checkout it was installed from (scripts/quickstart.sh, scripts/install.sh)."""
    return f"{sys.executable} -m pip install '.[{extra}]' in the locod checkout"


def from_frame(kind: str, code: str, message: str, decision: int | None = None) -> LocodError:
    """Rebuild the error a daemon reported: ``kind`` is the class's code, ``code`` the specific one, and
    ``decision`` the accepted turn it ended (its record, which ``locod decisions`` shows)."""
    error = _BY_CODE.get(kind, LocodError)(message, code=code)
    error.decision = decision
    return error
