"""A small client for the daemon's socket; the ``locod`` CLI is a thin layer over it.

    with Client() as c:
        result = c.ask("What is the capital of France?", session="demo")
        print(result.text, result.done.location)

Errors the daemon reports come back as the matching ``locod.errors`` class.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import stat
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import zmq

from locod.daemon.ownership import closed_to_this_user
from locod.errors import (
    AttachmentError,
    Busy,
    ConfigError,
    DaemonNotRunning,
    LocodError,
    ProtocolError,
    RequestError,
    UnsafeSocket,
)
from locod.filekinds import image_format
from locod.limits import ALWAYS_READ_BYTES, MAX_REPLY_BYTES, check_request_size
from locod.protocol import (
    LAST_FRAMES,
    READ_ONLY_OPS,
    Attachment,
    ChatOptions,
    ChatRequest,
    DecisionFrame,
    DeltaFrame,
    DoneFrame,
    ErrorFrame,
    EscalatedFrame,
    FallbackFrame,
    FeedbackRequest,
    Frame,
    RecordQuery,
    Request,
    ResultFrame,
    SimpleRequest,
    decode_frame,
    encode_request,
    endpoint_problem,
    ipv6,
    tcp_host_port,
    zmq_address,
)

MAX_ATTACHMENT_BYTES = 20 << 20  # the daemon's attachments.max_bytes, by default
# Connections the daemon closes, one after another with no frame between, before a client says it is refused:
# a restart closes one, its guard at a bound each one (libzmq reconnects every 100 ms).
REFUSED_AFTER = 3


def attachment(
    path: str | Path,
    *,
    private: bool = False,
    kind: str | None = None,
    max_bytes: int = MAX_ATTACHMENT_BYTES,
    name: str | None = None,
) -> Attachment:
    """Read a file into a protocol attachment (the daemon never needs to open client paths). An image is
    known by its first bytes, whatever its name: a GIF or a HEIC photo the daemon cannot read is then refused
    as an image it does not support, not as a document that is not text. The file is checked before it is read: a
    regular file (a FIFO would hang, ``/dev/zero`` never end) of at most ``max_bytes`` (the daemon's
    ``attachments.max_bytes``: it would refuse more), and no more than that is read. ``name`` (default: the
    file's name) is what records and notices call it: give two files of one turn different names."""
    path = Path(path)
    data = read_file(path, max_bytes)
    if kind is None:
        kind = "image" if image_format(data) else "document"
    return Attachment(kind, _as_text(name or path.name), data=data, private=private)


def _as_text(name: str) -> str:
    """A file's name as text the protocol can carry: bytes of it that are not UTF-8 (a FAT stick's or a
    Windows zip's Latin-1 name) as ``\\xe9`` escapes. As Python holds them (lone surrogates) the whole request
    was refused as not text, naming neither the file nor its name; so was any non-ASCII name in an ASCII
    locale (``LC_ALL=C`` without UTF-8 mode), whose UTF-8 bytes these give back."""
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that escapes no byte: given so by a Python caller
        raw = name.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def read_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``max_bytes``; opened without blocking, so a
    FIFO is refused rather than waited on. Every problem is an ``AttachmentError``, a missing or unreadable
    file included."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:  # missing, unreadable: a LocodError like every other attachment problem
        raise AttachmentError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValueError:  # a NUL byte in the path
        raise AttachmentError(f"{path!r}: the path holds a NUL byte", code="bad_path") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise AttachmentError(
                f"{path}: not a regular file (a FIFO, device or directory cannot be attached)", code="bad_path"
            )
        if info.st_size > max_bytes:
            raise AttachmentError(
                f"{path}: {info.st_size} bytes, over the {max_bytes}-byte attachment limit (attachments.max_bytes)",
                code="attachment_too_large",
            )
        with os.fdopen(os.dup(fd), "rb") as file:
            data = file.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # it grew since fstat
        raise AttachmentError(
            f"{path}: over the {max_bytes}-byte attachment limit (attachments.max_bytes)", code="attachment_too_large"
        )
    return data


@dataclass
class TurnResult:
    """One whole turn: the answer, and the frames that said where it ran and how it ended."""

    text: str
    decision: DecisionFrame
    done: DoneFrame
    fallback: FallbackFrame | None = None
    frames: list[Frame] = field(default_factory=list)
    escalated: EscalatedFrame | None = None

    @classmethod
    def of(cls, frames: list[Frame]) -> TurnResult:
        decision = next(f for f in frames if isinstance(f, DecisionFrame))
        done = frames[-1]
        assert isinstance(done, DoneFrame)
        fallback = next((f for f in reversed(frames) if isinstance(f, FallbackFrame)), None)
        escalated = next((f for f in frames if isinstance(f, EscalatedFrame)), None)
        restarts = [i for i, f in enumerate(frames) if isinstance(f, FallbackFrame | EscalatedFrame)]
        answer = frames[restarts[-1] :] if restarts else frames  # either frame restarts the answer
        text = "".join(f.text for f in answer if isinstance(f, DeltaFrame))
        return cls(text or done.text or "", decision, done, fallback, frames, escalated)


SYSTEM_SOCKET = Path("/run/locod/locod.sock")  # the system unit's RuntimeDirectory
HOW_TO_START = "start it with `locod serve`, `systemctl --user start locod` or `sudo systemctl start locod`"


def default_endpoint() -> str:
    from locod.daemon.config import load_config

    return locate(load_config().ipc_endpoint)


def locate(endpoint: str) -> str:
    """The user's own socket, or else their login session's, or else the system daemon's, whichever exists."""
    if not endpoint.startswith("ipc://") or _socket_exists(Path(endpoint[6:])):
        return endpoint
    try:
        found = next((path for path in (_session_socket(), SYSTEM_SOCKET) if path and _socket_exists(path)), None)
    except UnsafeSocket as exc:  # said with the user's own, for one whose own daemon is stopped on a shared box
        raise UnsafeSocket(
            f"locod is not running at {endpoint[6:]} (`locod serve` starts it), and {exc.message}"
        ) from None
    return f"ipc://{found}" if found else endpoint


def _session_socket() -> Path | None:
    """Where a daemon started in the user's login session (the user service) serves, for a process without
    XDG_RUNTIME_DIR: cron jobs and other shells outside a session get none, and looked under /tmp instead."""
    if os.path.isabs(os.environ.get("XDG_RUNTIME_DIR", "")):  # a relative one is ignored, as the daemon does
        return None
    return Path(f"/run/user/{os.getuid()}/locod/locod.sock")


def check_alive(endpoint: str, timeout_s: float = 1.0, *, connect: bool = True) -> None:
    """Raise DaemonNotRunning at once when nothing listens: a missing socket, a stale one left by a stopped
    daemon (connecting is refused), or a closed tcp port. Costs one connect, well under a millisecond, but
    it wakes the daemon's I/O thread too; ``connect=False`` checks only that the socket file exists. An ipc
    socket whose runtime directory's lock a process holds (a daemon's, for its life: the kernel lets go of it
    when the process ends, so a stale file holds none) is not connected to: the probe was a connection of its
    own, which at the socket's bound the daemon's guard counted, refused, or evicted another for."""
    address: str | tuple[str, int]
    if endpoint.startswith("ipc://"):
        path = Path(endpoint[6:])
        if not _socket_exists(path):
            raise DaemonNotRunning(_no_socket(path))
        if not connect or _flock_held(path.with_name("locod.lock")):
            return
        family, address = socket.AF_UNIX, str(path)
    elif (host_port := tcp_host_port(endpoint)) is not None:
        family, address = (socket.AF_INET6 if ":" in host_port[0] else socket.AF_INET), host_port
    else:
        return
    if not connect:
        return
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(timeout_s)
        try:
            probe.connect(address)
        except BlockingIOError:
            # A full backlog: a daemon listens there but accepts nothing now (stopped by SIGSTOP, swapping):
            # it runs, and a client that waits for its turn must not be told to start one.
            return
        except OSError as exc:
            raise DaemonNotRunning(
                f"locod is not running at {endpoint} ({exc.strerror or exc}); {HOW_TO_START}"
            ) from None


def _socket_exists(path: Path) -> bool:
    """Whether a socket file is at ``path``. UnsafeSocket when this user may not look there: on a shared
    machine the system service's /run/locod is 0700, its user's and root's alone, and every other user's
    `locod` ended in a bare "Permission denied" (``Path.exists`` raised it) that said neither whose socket
    it was nor what to use instead."""
    try:
        path.stat()
    except PermissionError:
        raise UnsafeSocket(_not_open_to_you(path)) from None
    except OSError:
        return False
    return True


def _not_open_to_you(path: Path) -> str:
    closed, owner = closed_to_this_user(path)
    return (
        f"{path} is not open to this user: {closed}, and a daemon's socket serves its own user and root alone; "
        f"run the command as {owner} (`sudo -u {owner} locod ...`), or ask the daemon's admin for the tcp "
        "endpoint or HTTP API it opens to other users (`--endpoint tcp://...`; docs/operations.md, Who can use it)"
    )


def _no_socket(path: Path) -> str:
    """Why nothing serves at ``path``: a daemon that holds its runtime directory's lock is loading its models
    (or finishing its last turns), and telling its user to start one sends them to a second daemon's refusal."""
    lock = path.with_name("locod.lock")
    if _flock_held(lock):
        return (
            f"locod is starting or stopping: a daemon holds {lock} but serves no socket yet; try again in a few "
            "seconds (`until locod status >/dev/null 2>&1; do sleep 1; done` waits for it)"
        )
    return f"locod is not running (no socket at {path}); {HOW_TO_START}"


def _flock_held(path: Path) -> bool:
    """Whether some process holds a flock on ``path``, read from /proc/locks: taking one to test would make a
    daemon that starts at that instant fail as "already running"."""
    try:
        held = path.stat()
        locks = Path("/proc/locks").read_text()
    except OSError:
        return False
    file_id = f"{os.major(held.st_dev):02x}:{os.minor(held.st_dev):02x}:{held.st_ino}"
    return any(line.split()[1:2] == ["FLOCK"] and file_id in line.split() for line in locks.splitlines())


def listener_pid(socket_path: str) -> int:
    """The pid of the process listening on an ipc socket, from the kernel (SO_PEERCRED), never from what
    the daemon says: a pid reported across a pid namespace (a socket shared from a container) is someone
    else's here, and the kernel gives 0 for a process this namespace cannot see."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(socket_path)
        except OSError as exc:
            raise DaemonNotRunning(
                f"locod is not running at {socket_path} ({exc.strerror or exc}); {HOW_TO_START}"
            ) from None
        credentials = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid = struct.unpack("3i", credentials)[0]
    if pid <= 0:
        raise DaemonNotRunning(f"the locod at {socket_path} runs in a process this system cannot see: stop it there")
    return pid


def check_owner(socket_path: Path) -> None:
    """Send nothing to a socket (or its directory) another user owns or can replace: whoever created
    /tmp/locod-$UID first would otherwise receive this user's prompts and attachments. The system unit's
    socket is trusted as it is: systemd makes its directory under root's /run."""
    if socket_path == SYSTEM_SOCKET:
        return
    for path in (socket_path, socket_path.parent):
        info = path.stat()
        if info.st_uid not in (os.getuid(), 0) or (path != socket_path and info.st_mode & 0o022):
            raise UnsafeSocket(
                f"{path} belongs to uid {info.st_uid} (mode {info.st_mode & 0o7777:o}), not to this user: "
                "refusing to send anything to the socket there"
            )


class Client:
    """One connection to the daemon: ``endpoint`` defaults to the configured ipc socket (or the system
    service's). ``timeout_s`` bounds the wait for a reply to every request but ``chat``; ``turn_timeout_s``
    the silence within a turn, not its length (a long answer streams on). Either raises ``DaemonNotRunning``.
    ``secret``: the tcp endpoint's shared secret. There is no deadline for a whole turn: to give one, stop
    iterating ``chat`` when it passes.

    Stopping a turn: leave ``chat``'s loop (``break``, an exception) or close the iterator, and the turn is
    cancelled (recorded ``cancelled``): the protocol has no cancel message, so the Client closes its
    connection and opens a new one, which cancels any other turn it had in flight as well (its loop raises
    ``Busy``, code ``cancelled``; closing the Client, ``RequestError`` ``client_closed``). ``chat`` sends
    the turn when its first frame is asked for: one never iterated is never sent; one whose iterator is kept
    but no longer read runs to its end. Other requests may be made inside the loop (``status``, ``feedback``
    of the turn before): each turn's frames wait for its own loop.

    Threads: a Client is one ZeroMQ socket, which is not thread-safe; while a request of one thread is in
    flight, another thread's request raises ``Busy`` (code ``client_in_use``). Give each thread its own
    Client (connecting costs well under a millisecond); from asyncio, run ``ask`` in a thread
    (``asyncio.to_thread``) that opens its own. A Client outlives a daemon restart: while none runs,
    requests raise ``DaemonNotRunning``, and the next request after the start is answered.

    Every error is a ``locod.errors.LocodError`` with a stable ``code`` (docs/protocol.md, Errors). Worth
    retrying as it is: ``Busy`` (``busy``, ``shutting_down``), ``StorageError`` (``db_locked``, and
    ``disk_full`` once space is back) and ``DaemonNotRunning``; a ``RequestError`` needs a changed request.
    Client-side ones: an endpoint that is not ``ipc://PATH`` or ``tcp://HOST:PORT`` is a ``ConfigError``
    (``bad_endpoint``), a request on a closed Client a ``RequestError`` (``client_closed``), a connection closed
    before a turn's answer ended (a reply frame over ``MAX_REPLY_BYTES`` closes it) ``DaemonNotRunning``
    (``connection_lost``).
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout_s: float = 10.0,
        turn_timeout_s: float = 600.0,
        secret: str | None = None,
    ) -> None:
        self.endpoint = endpoint or default_endpoint()
        problem = endpoint_problem(self.endpoint)
        if problem is not None:
            raise ConfigError(problem, code="bad_endpoint")
        self.timeout_ms = int(timeout_s * 1000)
        self.turn_timeout_ms = int(turn_timeout_s * 1000)
        self.secret = secret
        check_alive(self.endpoint)
        if self.endpoint.startswith("ipc://"):
            check_owner(Path(self.endpoint[6:]))
        self._sock = self._connect()
        self._daemon_config: dict[str, Any] | None = None  # fetched for the first request that could be dropped
        self._guard = threading.Lock()
        self._owner: int | None = None  # the thread whose requests are in flight
        self._in_flight: set[str] = set()
        self._held: dict[str, deque[Frame]] = {}  # frames that came while another request's were read
        self._cut: set[str] = set()  # requests in flight on a connection closed to cancel another turn
        # Unanswered requests in flight, each with the drops counted before it was sent (_drops), and as sent
        # where it is read-only (sent again after a drop); None for the others (turns, feedback), sent once
        self._sent: dict[str, tuple[bytes | None, int]] = {}

    def close(self) -> None:
        self._close_socket()

    def _close_socket(self) -> None:
        self._monitor.close(linger=0)
        self._sock.close(linger=0)

    def _reconnect(self) -> None:
        """A new connection in place of this one: closing it cancels every turn it had in flight, whose loops
        are told so when they next read (they waited out ``turn_timeout_s`` for frames that never came)."""
        if self._sock.closed:  # the caller closed the Client: that cancelled them
            return
        self._close_socket()
        self._sock = self._connect()
        self._cut |= self._in_flight

    def _connect(self) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY_BYTES)
        sock.setsockopt(zmq.IPV6, ipv6(self.endpoint))
        try:
            sock.connect(zmq_address(self.endpoint))  # type: ignore[arg-type]  # pyzmq takes bytes too
        except zmq.ZMQError as exc:  # not an endpoint at all: "localhost:5555", "tcp://host" without a port
            sock.close(linger=0)
            raise ConfigError(
                f"endpoint {self.endpoint!r}: {exc.strerror}; locod listens on ipc://PATH or tcp://HOST:PORT",
                code="bad_endpoint",
            ) from None
        # At an address of its own: pyzmq's default is by the socket's descriptor, which a reconnect may reuse
        self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED, f"inproc://locod-client-{uuid.uuid4().hex}")
        self._dropped = 0  # times the daemon closed the connection since the last frame came
        self._drops = 0  # times it closed it in all
        return sock

    def _claim(self, rid: str) -> None:
        """Refuse a second thread while the first one's replies are unread: both would read one socket, and
        each would drop the other's frames as replies to a request it does not know."""
        if self._sock.closed:
            raise RequestError("this Client is closed: open a new one", code="client_closed")
        with self._guard:
            me = threading.get_ident()
            if self._owner not in (None, me):
                raise Busy(
                    "this Client is in use by another thread, whose request is not answered yet: a Client is one "
                    "socket, for one thread at a time; give each thread its own Client",
                    code="client_in_use",
                )
            self._owner = me
            self._in_flight.add(rid)

    def _release(self, rid: str) -> None:
        with self._guard:
            self._in_flight.discard(rid)
            self._held.pop(rid, None)
            self._cut.discard(rid)
            self._sent.pop(rid, None)
            if not self._in_flight:
                self._owner = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- frames --------------------------------------------------------------------------------------

    def send(self, request: Request) -> str:
        """Send without waiting; returns the id its frames carry (read them with ``frames``). A chat request
        large enough that the daemon might drop it unanswered is first checked against the daemon's limits."""
        raw = encode_request(request)
        if isinstance(request, ChatRequest) and len(raw) > ALWAYS_READ_BYTES:
            check_request_size(len(raw), request.attachments, self.daemon_config())
        self._claim(request.id)
        self._count_drops()  # one before the send did not lose this request
        resendable = isinstance(request, SimpleRequest) and request.op in READ_ONLY_OPS
        self._sent[request.id] = (raw if resendable else None, self._drops)
        try:
            self._sock.send(raw)
        except BaseException:
            self._release(request.id)
            raise
        return request.id

    def frames(self, rid: str, timeout_ms: int) -> Generator[Frame, None, None]:
        """Replies to request ``rid`` until its last frame; raises the reported error on an error frame.
        ``timeout_ms`` limits the silence, not the turn: a long answer on a slow device streams on. While
        nothing arrives, the daemon is checked for life every second: one that stopped is noticed at once,
        not after ``timeout_ms``."""
        try:
            yield from self._read(rid, timeout_ms)
        finally:
            self._release(rid)

    def _read(self, rid: str, timeout_ms: int) -> Iterator[Frame]:
        while True:
            held = self._held.get(rid)
            frame = held.popleft() if held else self._receive(rid, timeout_ms)
            if isinstance(frame, ErrorFrame):
                raise frame.error()
            yield frame
            if frame.type in LAST_FRAMES:
                return

    def _receive(self, rid: str, timeout_ms: int) -> Frame:
        """The next frame for ``rid`` off the socket, within ``timeout_ms`` of silence. A frame for another of
        this thread's requests in flight is held for it: a ``status`` or ``feedback`` asked inside a ``chat``
        loop read past the turn's frames and dropped them, so its text lost words, or its ``done`` and the
        loop waited out ``turn_timeout_s``."""
        if self._sock.closed:  # while a turn's loop was suspended: zmq's "Operation not supported" said so
            raise RequestError("this Client was closed during the turn, which cancelled it", code="client_closed")
        if rid in self._cut:
            raise Busy(
                "the turn was cancelled: leaving another turn's loop on this Client closed its connection, which "
                "cancels every turn it has in flight; give each turn you may stop alone its own Client",
                code="cancelled",
            )
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._check_not_refused()  # closed in the last second, on a machine busy enough to be slow at it
                raise DaemonNotRunning(  # its socket took connections meanwhile (check_alive): it runs
                    f"nothing from locod at {self.endpoint} for {timeout_ms / 1000:g} s, though its socket takes "
                    "connections: the daemon may be stuck or stopped (SIGSTOP, swapping), or dropped the request; "
                    "see its log"
                )
            if not self._sock.poll(int(min(left, 1.0) * 1000), zmq.POLLIN):
                check_alive(self.endpoint)
                self._resend_if_dropped()
                sent = self._sent.get(rid)
                if sent is not None and sent[0] is None and sent[1] < self._drops:  # a turn or feedback the drop lost
                    raise self._lost()
                continue
            self._dropped = 0
            frame_id, frame = decode_frame(self._sock.recv())
            if frame_id == rid:
                return frame
            if frame_id in self._in_flight:
                if self._sent.get(frame_id, (None, 0))[0] is not None:  # read-only, answered: a drop after this
                    del self._sent[frame_id]  # does not send it again
                self._held.setdefault(frame_id, deque()).append(frame)
            # else a late reply to an earlier, abandoned request

    def _resend_if_dropped(self) -> None:
        """Send the unanswered read-only requests again when the daemon closed the connection they went out on:
        one it took then shut (its guard, counting connections that had just closed as still open) lost them,
        and their client waited out the timeout on the new connection to be told the daemon might be stuck.
        Every one in flight, not only the one being read: the others' drop was counted here, so reading them
        next would never resend them. Only those sent before the drop: one the daemon made of a connection
        closed while this Client was idle, counted after the next request went out, had it sent twice and
        answered twice. A turn or a feedback is never sent twice: the daemon may have read it before the
        connection closed.

        ZeroMQ connects again after a drop, queueing what is sent meanwhile, but not after a frame it refused
        (over MAX_REPLY_BYTES): that connection is gone for good, and a send on it waited forever."""
        self._check_not_refused()
        for rid, (raw, drops_before) in list(self._sent.items()):
            if raw is not None and drops_before < self._drops:
                try:
                    self._sock.send(raw, zmq.NOBLOCK)
                except zmq.Again:
                    raise self._lost() from None
                self._sent[rid] = (raw, self._drops)

    def _lost(self) -> DaemonNotRunning:
        """The error for a request whose connection closed before its last frame and cannot be sent again (a
        turn or a feedback, or any once the connection is gone for good): its answer went with the connection
        (a turn is cancelled with it), so waiting out the timeout, as the client did, would only end in "the
        daemon may be stuck". The Client connects afresh, for the next request."""
        self._reconnect()
        return DaemonNotRunning(
            f"locod at {self.endpoint} closed the connection before the answer's end, which was lost with it: the "
            "daemon stopped or restarted meanwhile (see its log), was at its bound on connections, or what answers "
            f"there sent a frame over the {MAX_REPLY_BYTES} bytes this client reads (locod.limits.MAX_REPLY_BYTES)",
            code="connection_lost",
        )

    def _check_not_refused(self) -> None:
        """Raise ``DaemonNotRunning`` (``connection_refused``) when the daemon closes each connection this
        client makes: its guard refuses one over the socket's bound on connections, and the client, which
        reconnects by itself, waited out its timeout to be told the daemon might be stuck (docs/protocol.md)."""
        self._count_drops()
        if self._dropped >= REFUSED_AFTER:
            raise DaemonNotRunning(
                f"locod at {self.endpoint} closed this client's connection {self._dropped} times without an "
                "answer: it is at its bound on connections, from this process or from all (a program that opens "
                "a Client for each request and never closes it?); close the ones you no longer use, and `locod "
                "status` shows the bound and the refusals",
                code="connection_refused",
            )

    def _count_drops(self) -> None:
        """Count the daemon's closes of this client's connection that its monitor has reported."""
        while self._monitor.poll(0):
            self._monitor.recv_multipart()
            self._dropped += 1
            self._drops += 1

    def call(self, op: str, **fields: Any) -> Any:
        if op == "feedback":
            rid = self.send(FeedbackRequest(new_id(), fields["decision"], fields["satisfied"], self.secret))
        else:
            rid = self.send(SimpleRequest(new_id(), op, secret=self.secret, **fields))
        for frame in self.frames(rid, self.timeout_ms):
            if isinstance(frame, ResultFrame):
                return frame.data
        raise LocodError("the daemon closed the reply without a result")

    # -- operations ----------------------------------------------------------------------------------

    def ping(self) -> dict[str, Any]:
        return dict(self.call("ping"))

    def status(self) -> dict[str, Any]:
        return dict(self.call("status"))

    def decisions(
        self,
        limit: int = 20,
        of: int | str | None = None,
        *,
        session: str | None = None,
        location: str | None = None,
        outcome: str | None = None,
        since: float | datetime | None = None,
        before: int | None = None,
    ) -> list[dict[str, Any]]:
        """The newest records, or (``of``) the one of a decision id (an int, as frames carry it) or of a request
        id: an HTTP completion's ``id``, a socket chat's request id; only those of ``session``, answered at
        ``location`` (local, cloud: the record's ``backend``; its ``location`` is where the turn was decided to
        run, before a fallback or an escalation), ending in ``outcome``, accepted at or after ``since`` (Unix
        time, or a datetime: a naive one is local time), with an id below ``before`` (the next page back: the
        oldest id of a full page), where given (``RecordQuery``). Narrowed, it raises
        ``ProtocolError`` (``daemon_outdated``) when the daemon does not say it narrows by those fields."""
        if isinstance(since, datetime):
            since = since.timestamp()
        query = RecordQuery(limit, None if of is None else str(of), session, location, outcome, since, before)
        self._check_narrowing(query)
        return list(self.call("decisions", query=query))

    def _check_narrowing(self, query: RecordQuery) -> None:
        """Refuse a narrowed query to a daemon whose ``ping`` does not list its fields: one older than them
        ignores them and answers the newest records, unfiltered, as if each matched. Asked every time (a
        ``ping`` is answered on the daemon's loop): the daemon may have been restarted, or upgraded, since."""
        asked = query.narrowing()
        if not asked:
            return
        ping = self.ping()
        missing = [name for name in asked if name not in ping.get("decisions_narrowing", ())]
        if missing:
            raise ProtocolError(
                f"the running daemon (locod {ping.get('version')}, pid {ping.get('pid')}) does not narrow decision "
                f"records by {', '.join(missing)} (it runs code from before the narrowing): restart it to run the "
                "upgraded locod (`locod stop`, then start it as before), then ask again",
                code="daemon_outdated",
            )

    def feedback(self, decision: int, satisfied: bool) -> dict[str, Any]:
        return dict(self.call("feedback", decision=decision, satisfied=satisfied))

    def reload(self) -> dict[str, Any]:
        return dict(self.call("reload"))

    def daemon_config(self) -> dict[str, Any]:
        """The running daemon's configuration, fetched once: what requests and files to attach are checked
        against before they are sent or read."""
        if self._daemon_config is None:
            self._daemon_config = dict(self.config()["config"])
        return self._daemon_config

    def config(self) -> dict[str, Any]:
        """The running daemon's effective configuration (``{pid, config}``); it holds no secrets."""
        return dict(self.call("config"))

    def chat(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        session: str | None = None,
        model: str | None = None,
        attachments: list[Attachment] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        seed: int | None = None,
        force: str | None = None,
        stream: bool = True,
        queued: bool = False,
        stop: str | list[str] | None = None,
        top_p: float | None = None,
        frequency_penalty: float | None = None,
        presence_penalty: float | None = None,
        response_format: dict[str, Any] | None = None,
    ) -> Iterator[Frame]:
        """Stream the frames of one turn: ``decision``, ``delta``..., (``fallback`` or ``escalated``, then
        ``delta``... again), ``done``. ``force``
        is "local" or "cloud"; an option left None takes the daemon's default. ``queued``: ``queued`` frames
        first while the turn waits for the local model (each restarts the silence timeout). ``stop``: up to 4
        sequences; the answer ends before the first of them. ``top_p`` and the penalties, left None, are the
        answering model's own. ``response_format``: OpenAI's, ``{"type": "json_object"}`` or ``{"type":
        "json_schema", "json_schema": {"name": ..., "schema": {...}}}``: the answer is JSON (a local model is
        held to it by a grammar)."""
        if messages is None:
            messages = [{"role": "user", "content": prompt or ""}]
        options = ChatOptions(
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            force=force,
            stream=stream,
            queued=queued,
            stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),  # one string: one sequence, as HTTP
            top_p=top_p,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            response_format=response_format,
        )
        request = ChatRequest(new_id(), messages, session, model, attachments or [], options, self.secret)
        # No connect per turn (it sits in the first token's path): a daemon that stopped cleanly took its
        # socket file along; a killed one is noticed by `frames` after a second of silence.
        check_alive(self.endpoint, connect=False)
        first, frames = self._first_frame(request)
        last = first
        try:
            yield first
            for last in frames:
                yield last
        except GeneratorExit:
            frames.close()
            if last.type not in LAST_FRAMES:  # the caller left the loop before the turn ended: cancel it
                self._reconnect()
            raise

    def _first_frame(self, request: ChatRequest) -> tuple[Frame, Generator[Frame, None, None]]:
        """The turn's first frame and the rest of its frames. A daemon from before ``queued`` frames (upgraded,
        not yet restarted) refuses the option before it accepts anything: the turn is asked again without it."""
        frames = self.frames(self.send(request), self.turn_timeout_ms)
        try:
            return next(frames), frames
        except ProtocolError as exc:
            options = request.options
            if not (options.queued and exc.code == "bad_field" and "'queued'" in exc.message):
                raise
            request = dataclasses.replace(request, id=new_id(), options=dataclasses.replace(options, queued=False))
            frames = self.frames(self.send(request), self.turn_timeout_ms)
            return next(frames), frames

    def ask(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        session: str | None = None,
        model: str | None = None,
        attachments: list[Attachment] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        seed: int | None = None,
        force: str | None = None,
        stream: bool = True,
        queued: bool = False,
        stop: str | list[str] | None = None,
        top_p: float | None = None,
        frequency_penalty: float | None = None,
        presence_penalty: float | None = None,
        response_format: dict[str, Any] | None = None,
    ) -> TurnResult:
        """One whole turn: the answer text with its decision and done frames; the options are ``chat``'s."""
        frames = self.chat(
            prompt,
            messages=messages,
            session=session,
            model=model,
            attachments=attachments,
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            force=force,
            stream=stream,
            queued=queued,
            stop=stop,
            top_p=top_p,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            response_format=response_format,
        )
        return TurnResult.of(list(frames))


def new_id() -> str:
    return uuid.uuid4().hex[:16]
