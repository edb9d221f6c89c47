"""The daemon: ZeroMQ sockets, the serving loop, and the lifecycle (start, reload, stop).

One thread owns the sockets and never blocks on work: it parses requests, answers the cheap ops
(``ping``, ``status``, ``decisions``, ``reload``, ``config``) itself, hands labels (``feedback``, whose write
may wait for another process's lock) to a thread of their own and chat turns to a thread pool.
Worker threads queue their frames for this thread, which forwards them to the client's ROUTER socket
(ZeroMQ sockets are not thread-safe), and wake it through an inproc PUSH/PULL pair: one queue, so a turn's
frames keep their order whichever of its threads sent them. A client that vanishes mid-stream is
noticed on send (ROUTER_MANDATORY), or within a second while its turns send nothing (``peerlink.py``), and
its turns are cancelled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import queue
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import zmq

from locod import __version__
from locod.build import code_digest
from locod.daemon.backlog import PIPE_MESSAGES, Backlog
from locod.daemon.cloud import CloudBackend
from locod.daemon.config import Config, as_dict, load_config, redacted_url
from locod.daemon.decider import Decider
from locod.daemon.fdlimit import IPC_SHARE, TCP_SHARE, door_share, raise_soft_limit
from locod.daemon.heap import pin_mmap_threshold
from locod.daemon.keyfile import http_api_key, tcp_secret
from locod.daemon.learner import Learner
from locod.daemon.local import LocalBackend, ModelZoo, check_chat_formats
from locod.daemon.logs import Throttle, configure_logging, flush_throttles
from locod.daemon.modelfile import check_model_file
from locod.daemon.notify import Notifier
from locod.daemon.ownership import make_private_dir, unwritable
from locod.daemon.peerlink import Link, vanished
from locod.daemon.records import LABEL_WAIT_S, DecisionLog
from locod.daemon.reply import Reply
from locod.daemon.sessions import IPC, TCP, SessionStore, door_of
from locod.daemon.shadow import ShadowLane
from locod.daemon.tcpauth import TcpAuth
from locod.daemon.tcpguard import HANDSHAKE_S, DoorGuard
from locod.daemon.telemetry import TelemetrySampler
from locod.daemon.turn import TurnRunner
from locod.errors import (
    Busy,
    ConfigError,
    LocodError,
    PromptTooLong,
    ProtocolError,
    RequestError,
    StorageError,
    install_hint,
)
from locod.protocol import (
    NARROWING,
    BadRequest,
    ChatRequest,
    DeltaFrame,
    ErrorFrame,
    FeedbackRequest,
    Frame,
    ResultFrame,
    SimpleRequest,
    as_json,
    encode_frame,
    ipv6,
    parse_request,
)
from locod.words import counted, or_na

if TYPE_CHECKING:
    from locod.daemon.httpapi import HttpServer

log = logging.getLogger(__name__)

# Wake-ups only, one per item queued for the loop: frames from worker threads (Daemon._outgoing), and turns
# handed in by another thread, the HTTP API's (Daemon._handed_in).
OUTBOX = "inproc://locod-outbox"
INBOX = "inproc://locod-inbox"
# Config sections a reload cannot apply to a running daemon: bound sockets, open paths and the telemetry
# readers built from them. Local models do apply: the zoo loads the new table's models on demand.
AS_STARTED = ("paths", "daemon", "http", "telemetry")
# Keys of sections a reload applies that are read at start all the same: the disk park is opened with its size.
AS_STARTED_KEYS = (("local", "cache_disk_mb"),)
# Labels waiting for the feedback thread; past this a `feedback` is answered busy (a flood is not queued).
FEEDBACK_QUEUE = 64
INTERNAL = ErrorFrame("error", "internal", "internal error")  # a bug's answer: the log has its traceback


class Daemon:
    """One running daemon: its doors and serving loop (this module), and the turn's path it hands turns to."""

    def __init__(
        self, config: Config, config_path: str | None = None, overrides: Mapping[str, str] | None = None
    ) -> None:
        """Claim the state and runtime directories, open the decision log and build the turn's path (models,
        backends, router, learner), then the loop's own state; nothing is bound or loaded until ``start``."""
        self.config = config
        self._config_path = config_path
        self._overrides = dict(overrides or {})
        self.started = time.monotonic()  # uptime: a wall clock set back or forward meanwhile is no part of it
        self.code = code_digest()  # the code it runs: `locod status` tells it from the installed one
        os.umask(0o077)  # the decision log and router state are the user's business alone
        self._state_lock = _exclusive_lock(config.state_dir, TAKEN_AT_START)  # held, never read: lasts as long as it
        self._runtime_lock = _exclusive_lock(config.runtime_dir, TAKEN_AT_START)  # taken again if the directory goes
        self.notifier = Notifier()
        self._build_turn_path(config)
        self._prepare_loop(config)

    def _build_turn_path(self, config: Config) -> None:
        """The long-lived objects a turn goes through, each the one owner of its state (docs/architecture.md)."""
        self.records = DecisionLog(config.db_path, lambda what, s: self.notifier.extend_start(max(s, 90.0), what))
        self.zoo = ModelZoo.configured(config)
        self.local = LocalBackend(self.zoo)
        self.cloud = CloudBackend(config.cloud, config.source)
        limits = config.daemon
        self.sessions = SessionStore(limits.session_idle_s, limits.max_sessions, limits.max_history_chars)
        self.telemetry = TelemetrySampler(config, self.cloud, self.local)
        self.learner = Learner(config, self.records, self.cloud)
        self.decider = Decider(config, self.learner, self.records, self.telemetry, self.local, self.cloud)
        self.shadow = ShadowLane(config, self.local, self.learner, self.records, self.telemetry)
        self.runner = TurnRunner(
            config, self.sessions, self.local, self.cloud, self.records, self.decider, self.learner, self.shadow
        )

    def _prepare_loop(self, config: Config) -> None:
        """The serving loop's state: the queues and wake-ups that bring it frames and handed-in turns, the
        threads turns and labels run on, the turns in flight, and the doors (bound by ``start``)."""
        self.outbox: zmq.Socket[bytes] | None = None
        self.inbox: zmq.Socket[bytes] | None = None
        self._outgoing: queue.SimpleQueue[tuple[bytes, bytes]] = queue.SimpleQueue()  # (peer, frame)
        self._handed_in: queue.SimpleQueue[tuple[bytes, ChatRequest, Reply]] = queue.SimpleQueue()
        # Whether the loop still admits turns handed in, and the lock that keeps a hand-in from slipping in
        # after its last look at them (a turn queued then would wait for a loop that never comes).
        self._admitting = True
        self._admitting_lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=config.daemon.queue_limit, thread_name_prefix="turn")
        # Labels are written off the loop: a write can wait on SQLite's lock (another process holding it)
        # for the busy timeout, and the loop answers every other client meanwhile.
        self._feedback = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feedback")
        self._feedback_room = threading.BoundedSemaphore(FEEDBACK_QUEUE)
        # Turns in flight and whom they answer; changed only by the loop's thread (in_flight() reads a copy).
        self._turns: dict[Future[None], tuple[bytes, Reply]] = {}
        self._links: dict[bytes, Link] = {}  # the connection each socket client with turns in flight is on
        self.backlog = Backlog(config.daemon.max_queued_bytes)
        self.turns_served = 0
        # The same rejected config reloaded again and again (SIGHUP from a tool in a loop): its reply says it
        # each time, the log once a minute; anew after each accepted reload (``reload``).
        self._rejections = Throttle(log)
        # What the config file changed that the last accepted reload could not apply: status says it waits
        # for a restart (an [http] listen set and reloaded left status saying "off: set http.listen").
        self.restart_needed: list[str] = []
        self.stopping_since: float | None = None
        self.ctx = zmq.Context()
        # The PUSH sockets through which other threads wake the loop, one per endpoint, each behind its lock
        # (a ZeroMQ socket is not thread-safe): one per thread held a descriptor for each pool thread ever made.
        self._pushes: dict[str, tuple[threading.Lock, zmq.Socket[bytes]]] = {}
        self.sockets: dict[bytes, zmq.Socket[bytes]] = {}
        self._socket_lost = False  # the ipc socket's file was removed, and binding it again failed
        self.http: HttpServer | None = None  # when http.listen is set
        self.guards: dict[bytes, DoorGuard] = {}  # each socket's connections, bounded (by its tag)
        self.tcp_auth = TcpAuth(None)  # its secret is read at start, and again at each reload

    # -- start ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Check the configured models, load the default one, bind the doors and start telemetry (and the
        HTTP door); then tell systemd the daemon is ready. A failure raises before READY."""
        cfg = self.config
        self.tcp_auth = TcpAuth(tcp_secret(cfg))
        fd_limit = raise_soft_limit()  # libzmq aborts when its ipc listener finds no descriptor (fdlimit.py)
        pin_mmap_threshold()  # before the model loads and KV states come and go (heap.py)
        if self.records.interrupted_at_start:
            log.warning(
                "%d turns were interrupted by the previous daemon's stop; marked 'interrupted'",
                self.records.interrupted_at_start,
            )
        default = cfg.local_model(cfg.local.default)
        check_chat_formats(cfg)
        check_model_file(default, cfg.models_dir)
        self.zoo.get(default.name)  # load once before READY: the first turn should not pay for it
        self._bind_sockets(fd_limit)
        self.telemetry.start()
        self._install_signals()
        if cfg.http.listen:
            self.http = _http_server(self)
            self.http.start()
        log.info(
            "locod %s serving on %s%s with local model %s",
            __version__,
            cfg.ipc_endpoint,
            f" and {cfg.daemon.tcp}" if cfg.daemon.tcp else "",
            default.name,
        )
        self.notifier.ready(self._status_line())

    def _bind_sockets(self, fd_limit: int) -> None:
        """The loop's wake-up sockets, then the doors: the ipc socket, and the tcp endpoint, each with its guard
        (its connections bounded within ``fd_limit``, the open-file limit)."""
        cfg = self.config
        self.outbox = self.ctx.socket(zmq.PULL)
        self.outbox.bind(OUTBOX)
        self.inbox = self.ctx.socket(zmq.PULL)
        self.inbox.bind(INBOX)
        for endpoint in (OUTBOX, INBOX):
            push = self.ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.SNDHWM, 0)  # a wake-up never blocks a sender (holding the lock) on the loop
            push.connect(endpoint)
            self._pushes[endpoint] = (threading.Lock(), push)
        self.sockets[IPC] = self._router_socket()
        cfg.socket_path.unlink(missing_ok=True)  # a stale socket of a dead daemon; the lock says none is alive
        self._bind_ipc()
        ipc_share = max(1, int(fd_limit * IPC_SHARE))
        # One process holds half of it at most: a script leaking clients that had each asked (none evictable)
        # took every place, and `locod status` and `locod stop` were refused until it ended.
        ipc_bounds = ("an eighth of the open-file limit", "half the ipc socket's bound, from one process")
        self.guards[IPC] = DoorGuard(
            self.sockets[IPC], ipc_share, max(1, ipc_share // 2), ipc_bounds, self._connections_in_turn
        )
        if cfg.daemon.tcp:
            self.sockets[TCP] = self._router_socket()
            self.sockets[TCP].setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_S * 1000)
            _bind_tcp(self.sockets[TCP], cfg.daemon.tcp)
            share = door_share("daemon.max_tcp_connections", cfg.daemon.max_tcp_connections, fd_limit, TCP_SHARE)
            bounds = ("daemon.max_tcp_connections", "daemon.max_tcp_per_host")
            self.guards[TCP] = DoorGuard(self.sockets[TCP], share, cfg.daemon.max_tcp_per_host, bounds)

    def _router_socket(self) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished client raises instead of dropping
        sock.setsockopt(zmq.LINGER, 0)
        # Hard ceiling: a frame far over the configured limit is dropped by ZeroMQ before it is buffered.
        # Frames between the limit and this ceiling get a `too_large` error reply.
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * self.config.daemon.max_message_bytes + 4096)
        sock.setsockopt(zmq.SNDHWM, PIPE_MESSAGES)  # beyond this, frames wait in the byte-bounded backlog
        sock.setsockopt(zmq.HEARTBEAT_IVL, 5000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 15000)
        return sock

    def _bind_ipc(self) -> None:
        """Bind the ipc socket, its file the owner's alone: the file modes are the socket's only protection."""
        self.sockets[IPC].bind(self.config.ipc_address)  # type: ignore[arg-type]  # pyzmq takes bytes too
        os.chmod(self.config.socket_path, 0o600)

    def _read_door_keys(self) -> tuple[str | None, str | None]:
        """The HTTP API's key (when it serves) and the tcp endpoint's secret, read again from the files the
        daemon started with (a new path waits for a restart, as the rest of [http] and [daemon] do): a reload
        is how a rotated key or secret replaces the old one, which would otherwise be accepted until a restart."""
        return http_api_key(self.config) if self.http is not None else None, tcp_secret(self.config)

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: None)  # the wakeup fd carries the signal number to the loop
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # blocked until now (control.cmd_serve)

    # -- the loop ------------------------------------------------------------------------------------

    def serve_forever(self) -> int:
        """The serving loop: signals, requests, frames and handed-in turns as they come; systemd's watchdog at
        its interval, the status line and the socket's file every 10 s, vanished clients each second. Returns 0
        once a stop has finished."""
        poller = zmq.Poller()
        for sock in self.sockets.values():
            poller.register(sock, zmq.POLLIN)
        assert self.outbox is not None
        poller.register(self.outbox, zmq.POLLIN)
        poller.register(self.inbox, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        for guard in self.guards.values():
            poller.register(guard.monitor, zmq.POLLIN)
        watchdog_every = self.notifier.watchdog_interval
        last_ping = last_status = last_look = 0.0
        while True:
            wait_ms = 10 if self.backlog else 250
            events = dict(poller.poll(timeout=min(guard.wait_ms(wait_ms) for guard in self.guards.values())))
            if self._wake_r.fileno() in events:
                self._on_signals()
            for tag, guard in self.guards.items():
                if guard.monitor in events:
                    guard.drain()  # before the requests: a connection over the bounds is shut first
                for fd, frames, let_in in guard.settle():  # the requests of a newcomer let in once it settled
                    self._take(tag, self.sockets[tag], frames, fd, let_in)
            for tag, sock in self.sockets.items():
                if sock in events:
                    self._drain_requests(tag, sock)
            if self.outbox in events:
                self._drain_outbox()
            if self.inbox in events:
                self._admit_handed_in()
            self._flush_backlog()
            now = time.monotonic()
            if watchdog_every is not None and now - last_ping >= watchdog_every:
                self.notifier.watchdog()
                last_ping = now
            if now - last_status >= 10:
                self.notifier.status(self._status_line())
                self._keep_socket()
                last_status = now
            for future in [f for f in self._turns if f.done()]:
                del self._turns[future]
                self.turns_served += 1
            if now - last_look >= 1:  # a client gone while its turns wait sends no frame that would say so
                for peer in vanished(self._links, {owner for owner, _ in self._turns.values()}):
                    self._cancel_turns_of(peer)
                last_look = now
            if self.stopping_since is not None and self._stop_step(now):
                return 0

    def _keep_socket(self) -> None:
        """Bind the ipc socket again when its file was removed (tmpfiles cleaning the runtime directory, a
        user's rm): the daemon served on, reachable by no client, `locod stop` included, and refused a new
        start for the state directory it still held. A directory made again by another daemon meanwhile (its
        lock held by that one) is that one's: its socket is left alone, and this daemon says how to stop it."""
        path = self.config.socket_path
        holds_runtime = self._holds_runtime()
        if holds_runtime and os.path.lexists(path):
            self._socket_lost = False
            return
        if not self._socket_lost:  # one warning a loss, not one every 10 s while it cannot be bound
            log.warning("the socket %s was removed under the running daemon; binding it again", path)
        try:
            if not holds_runtime:  # the whole directory went, and its lock with it: already_running if taken
                self._runtime_lock = _exclusive_lock(self.config.runtime_dir)
            with contextlib.suppress(zmq.ZMQError):  # unbound already, by a try whose bind then failed
                self.sockets[IPC].unbind(self.config.ipc_address)
            self._bind_ipc()
        except (LocodError, OSError, zmq.ZMQError) as exc:
            if not self._socket_lost:
                log.error(
                    "cannot bind %s again (%s): trying every 10 s; or stop this daemon: `kill %d`",
                    path,
                    exc,
                    os.getpid(),
                )
            self._socket_lost = True

    def _holds_runtime(self) -> bool:
        """Whether the runtime directory's lock file is still the one this daemon locked: a removed directory
        took it along, and another daemon may hold the one there now, and own the socket beside it."""
        try:
            there, held = os.stat(self.config.runtime_dir / "locod.lock"), os.fstat(self._runtime_lock.fileno())
        except OSError:
            return False
        return (there.st_dev, there.st_ino) == (held.st_dev, held.st_ino)

    def _drain_requests(self, tag: bytes, sock: zmq.Socket[bytes]) -> None:
        guard = self.guards.get(tag)
        for _ in range(100):  # bounded, so outgoing frames and signals are not starved
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            frames = [part.bytes for part in parts]
            fd = parts[-1].get(zmq.SRCFD)
            if guard is None or not guard.hold(fd, frames):  # held while its connection settles (tcpguard.py)
                self._take(tag, sock, frames, fd)

    def _take(self, tag: bytes, sock: zmq.Socket[bytes], frames: list[bytes], fd: int, let_in: bool = True) -> None:
        """Answer one message (its routing id first) come on connection ``fd`` of door ``tag``; ``let_in`` False
        for one held for a newcomer that closed before its door's guard let it in (tcpguard.py)."""
        peer = tag + frames[0]
        if len(frames) > 2 and frames[1] == b"":  # a REQ socket's envelope: it reads replies behind one
            self._refuse_req_socket(sock, frames[0])
            return
        try:
            self._dispatch(peer, tag, frames[1:], fd, let_in)
        except BadRequest as exc:
            self._send(peer, encode_frame(exc.request_id, ErrorFrame.of(exc)))
        except LocodError as exc:
            self._send(peer, encode_frame(None, ErrorFrame.of(exc)))
        except Exception:  # a bug in one request's handling must not take the loop down
            log.exception("request from a client failed")
            self._send(peer, encode_frame(None, INTERNAL))

    @staticmethod
    def _refuse_req_socket(sock: zmq.Socket[bytes], identity: bytes) -> None:
        """Say why to a REQ socket in the envelope it reads: a turn's several replies need a DEALER."""
        error = ErrorFrame(
            "protocol",
            "extra_frames",
            "this looks like a ZeroMQ REQ socket (an empty frame before the message): use a DEALER socket, "
            "which can receive a turn's several replies, and send one frame per message",
        )
        with contextlib.suppress(zmq.ZMQError):
            sock.send_multipart([identity, b"", encode_frame(None, error)], zmq.NOBLOCK)

    def _drain_outbox(self) -> None:
        if self.outbox is None:
            return
        for _ in range(1000):
            try:
                self.outbox.recv(zmq.NOBLOCK)  # one wake per queued frame, sent after the frame was queued
            except zmq.Again:
                return
            self._send(*self._outgoing.get_nowait())

    def _send(self, peer: bytes, frame: bytes) -> None:
        """Send now, or queue behind the peer's waiting frames; a peer past its byte bound is dropped."""
        if (peer in self.backlog or not self._try_send(peer, frame)) and not self.backlog.add(peer, frame):
            log.warning("a client is not reading its replies (over %d bytes waiting): dropped", self.backlog.limit)
            self._cancel_turns_of(peer)

    def _try_send(self, peer: bytes, frame: bytes) -> bool:
        """False if the peer's pipe is full; a frame for a vanished peer counts as sent (and is dropped)."""
        sock = self.sockets.get(peer[:1])
        if sock is None:
            return True
        try:
            sock.send_multipart([peer[1:], frame], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno == errno.EAGAIN:
                return False
            if exc.errno != errno.EHOSTUNREACH:
                raise
            self.backlog.discard(peer)
            self._cancel_turns_of(peer)
        return True

    def _flush_backlog(self) -> None:
        for peer in self.backlog.peers():
            while (frame := self.backlog.first(peer)) is not None and self._try_send(peer, frame):
                if peer in self.backlog:  # not discarded because the peer vanished
                    self.backlog.pop(peer)

    def _connections_in_turn(self) -> set[tuple[int, int]]:
        """The connections (descriptor, inode) of the clients with turns in flight: a guard spares them."""
        owners = {owner for owner, _ in self._turns.values()}
        return {(link.fd, link.inode) for peer, link in self._links.items() if peer in owners}

    def _cancel_turns_of(self, peer: bytes) -> None:
        for owner, reply in self._turns.values():
            if owner == peer:
                reply.cancelled.set()

    # -- requests ------------------------------------------------------------------------------------

    def _dispatch(self, peer: bytes, tag: bytes, frames: list[bytes], fd: int, let_in: bool = True) -> None:
        """Answer one request; ``fd`` is the connection it came on (for its door's guard), ``let_in`` as ``_take``
        says. A chat turn of a newcomer never let in is dropped: it would run, and be recorded, for nobody, and
        it was never acknowledged; a label or a reload is answered, as on a connection that closed after it."""
        if tag == TCP:
            self.tcp_auth.check_head(frames)
        request = parse_request(frames, self.config.daemon.max_message_bytes)
        if tag == TCP:
            self.tcp_auth.check(request)
        if (guard := self.guards.get(tag)) is not None and let_in:  # the number may name another connection now
            guard.vouch(fd)  # it passed the door's checks: evicted only for a far less greedy host (tcpguard.py)
        if isinstance(request, ChatRequest):
            if not let_in:
                log.debug("dropped chat %s: its connection closed before it was let in", request.id)
                return
            try:
                self._start_turn(peer, request)
                if (link := Link.of(fd)) is not None:  # the latest: a client may name its own routing id
                    self._links[peer] = link
            except LocodError as exc:  # busy, too long: the reply must carry the id the client waits on
                self._send(peer, encode_frame(request.id, ErrorFrame.of(exc)))
            except Exception:  # a bug: said to that id too, not left to the client's timeout
                log.exception("chat request failed before its turn started")
                self._send(peer, encode_frame(request.id, INTERNAL))
            return
        if isinstance(request, FeedbackRequest):
            self._label(peer, request)
            return
        frame: Frame
        try:
            frame = ResultFrame(request.op, self._answer(request))
        except LocodError as exc:
            frame = ErrorFrame.of(exc)
        except Exception:  # said to the client that waits on this id: one without the id waited out its timeout
            log.exception("%s request failed", request.op)  # and was told the daemon may be stuck
            frame = INTERNAL
        self._send(peer, encode_frame(request.id, frame))

    def _label(self, peer: bytes, request: FeedbackRequest) -> None:
        """Hand a label to the feedback thread, which answers it; refused busy when many are waiting."""
        if not self._feedback_room.acquire(blocking=False):
            error = Busy(f"{FEEDBACK_QUEUE} labels are waiting to be written; try again shortly")
            self._send(peer, encode_frame(request.id, ErrorFrame.of(error)))
            return

        queued_at = time.monotonic()

        def write() -> None:
            frame: Frame
            try:
                if time.monotonic() - queued_at > LABEL_WAIT_S:  # the labels before it waited out a lock
                    raise StorageError(
                        "the labels before this one found the decision log locked by another process; nothing "
                        "was written, try again once it lets go",
                        code="db_locked",
                    )
                frame = ResultFrame("feedback", self.learner.feedback(request.decision, request.satisfied, "user"))
            except LocodError as exc:
                frame = ErrorFrame.of(exc)
            except Exception:  # a bug costs this label, never the thread's next ones
                log.exception("feedback for decision %d failed", request.decision)
                frame = INTERNAL
            finally:
                self._feedback_room.release()
            self._post(peer, encode_frame(request.id, frame))

        self._feedback.submit(write)

    def _answer(self, request: SimpleRequest) -> Any:
        if request.op == "ping":
            return {"pong": True, "pid": os.getpid(), "version": __version__, "decisions_narrowing": list(NARROWING)}
        if request.op == "status":
            return self.status()
        if request.op == "decisions":
            return self.records.recent(request.query)
        if request.op == "reload":
            return {**self.reload(), "config": self.config.source}
        if request.op == "config":
            return {"pid": os.getpid(), "config": as_dict(self.config)}
        raise ProtocolError(f"op {request.op!r} has no handler", code="unknown_op")

    def _start_turn(self, peer: bytes, request: ChatRequest, reply: Reply | None = None) -> None:
        """Submit a turn to the pool, once it is admitted; ``reply`` is given for a turn handed in. A turn of a
        session takes its place in the session's queue here, in the order the turns arrive (it waits in
        ``TurnRunner.run`` for those before it to answer)."""
        self._check_admission(peer, request)
        reply = reply or Reply(post=self._poster(peer, request.id), request_id=request.id)
        if request.session is not None:
            self.sessions.enter(request.session, door_of(peer), reply.answered)
        self._turns[self.pool.submit(self.runner.run, request, peer, reply)] = (peer, reply)

    def _check_admission(self, peer: bytes, request: ChatRequest) -> None:
        """Refuse a turn (busy, too long) before any work on it: the daemon stopping, the queue full, the
        peer's door or the peer itself at its share of it, or more text than daemon.max_prompt_chars."""
        if self.stopping_since is not None:
            raise Busy("the daemon is shutting down", code="shutting_down")
        # A turn that has said its last frame holds no place (its learning step may still run): counted until
        # the loop took it away, the next turn of a client asking one after another (queue_limit 1, a `locod
        # ask` as soon as the last one exited) was refused busy.
        owners = [owner for owner, reply in self._turns.values() if not reply.answered.is_set()]
        if len(owners) >= self.config.daemon.queue_limit:
            raise Busy(f"{counted(len(owners), 'turn')} in flight, at the queue limit; try again shortly")
        self._check_id_is_free(peer, request.id)
        chars = sum(len(m["content"]) for m in request.messages)
        if chars > self.config.daemon.max_prompt_chars:  # refused by size, before any work on the text
            raise PromptTooLong(
                f"the request's messages hold {chars} characters, over daemon.max_prompt_chars "
                f"({self.config.daemon.max_prompt_chars})"
            )
        door, share = door_of(peer), self._door_share()
        through_door = sum(owner[:1] == peer[:1] for owner in owners)
        if through_door >= share:
            raise Busy(
                f"{through_door} turns from the {door} door are in flight, its share of daemon.queue_limit "
                f"({share} of {self.config.daemon.queue_limit}: the doors share it, so that one cannot starve "
                "another); try again shortly"
            )
        own = owners.count(peer)
        if own >= self.config.daemon.max_turns_per_client:
            raise Busy(
                f"this client (connection) has {own} turns in flight, at daemon.max_turns_per_client; try "
                "again when one is answered"
            )

    def _check_id_is_free(self, peer: bytes, request_id: str) -> None:
        """Refuse a turn whose id is a turn's still in flight on the same connection: both ran, their frames
        under one id, and the client read one answer's words mixed into the other's (or its ``done`` ended
        both). The refusal goes to that id; the turn before goes on."""
        if any(
            owner == peer and reply.request_id == request_id and not reply.answered.is_set()
            for owner, reply in self._turns.values()
        ):
            raise RequestError(
                f"a turn with id {as_json(request_id)} is still in flight on this connection: give each request its "
                "own id (a fresh UUID); the turn before goes on, its frames under that id",
                code="duplicate_id",
            )

    def _door_share(self) -> int:
        """The turns one door (ipc, tcp, HTTP) may have in flight: daemon.queue_limit split between the doors
        served. A door without authentication is open to every local user, who could otherwise fill the
        whole queue and leave the owner's socket nothing but `busy`."""
        doors = len(self.sockets) + (self.http is not None)
        return max(1, self.config.daemon.queue_limit // doors)

    def hand_in(self, client: bytes, request: ChatRequest, reply: Reply) -> None:
        """Start a turn from another thread (the HTTP API): the loop admits it as it does a socket's, under
        the same queue limit and shutdown, and ``reply`` gets its frames (a refusal as an ``error``)."""
        with self._admitting_lock:
            if self._admitting:
                self._handed_in.put((client, request, reply))
                self._wake_loop(INBOX)
                return
        reply.send(ErrorFrame.of(Busy("the daemon is shutting down", code="shutting_down")))

    def _admit_handed_in(self) -> None:
        assert self.inbox is not None
        with contextlib.suppress(zmq.Again):
            for _ in range(1000):
                self.inbox.recv(zmq.NOBLOCK)
        while not self._handed_in.empty():
            client, request, reply = self._handed_in.get_nowait()
            try:
                self._start_turn(client, request, reply)
            except LocodError as exc:
                reply.send(ErrorFrame.of(exc))

    def _poster(self, peer: bytes, request_id: str) -> Callable[[Frame], None]:
        """How a turn's worker threads send its frames. The ones a client waits on (all but the second and
        later deltas of a run) are followed by a yield of the CPU: on a busy machine the scheduler lets a
        running thread finish its time slice (milliseconds) before the thread it woke gets to run. Later
        deltas do not yield, which would hand each token's slice to whatever else the machine runs."""
        streaming = False

        def post(frame: Frame) -> None:
            nonlocal streaming
            delta = isinstance(frame, DeltaFrame)
            self._post(peer, encode_frame(request_id, frame))
            if not (delta and streaming):
                os.sched_yield()
            streaming = delta

        return post

    def _post(self, peer: bytes, frame: bytes) -> None:
        """Send from a worker thread: queue the frame, then wake the loop."""
        self._outgoing.put((peer, frame))
        self._wake_loop(OUTBOX)

    def _wake_loop(self, endpoint: str) -> None:
        """Wake the loop through the PUSH socket to ``endpoint``, one thread at a time."""
        lock, push = self._pushes[endpoint]
        with lock:
            push.send(b"")

    # -- status, reload, stop ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The `status` op's reply (docs/protocol.md): the daemon itself, its local models, the cloud, the
        queue and the tcp door, then sessions, telemetry and routing."""
        cfg = self.config
        return {
            "version": __version__,
            "code": self.code,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "endpoints": [cfg.ipc_endpoint, *([cfg.daemon.tcp] if cfg.daemon.tcp else [])],
            "config": cfg.source,
            "http": f"http://{self.http.listen}/v1" if self.http is not None else None,
            "db": str(cfg.db_path),
            "db_warning": self.records.warning,
            "restart_needed": self.restart_needed,
            "local": self._local_status(),
            "cloud": self._cloud_status(),
            "queue": {
                "in_flight": self.in_flight(),
                "waiting_for_local": self.local.gate.waiting,
                "waiting_for_session": self.sessions.waiting,
                "backlog_bytes": self.backlog.queued_bytes(),
            },
            "tcp": self.guards[TCP].status() if TCP in self.guards else None,
            "ipc": self.guards[IPC].status() if IPC in self.guards else None,
            "sessions": len(self.sessions),
            "turns_served": self.turns_served + len(self._turns) - self.in_flight(),
            "interrupted_at_start": self.records.interrupted_at_start,
            "telemetry": self.telemetry.snapshot().row,
            "routing": self._routing_status(),
            "stopping": self.stopping_since is not None,
        }

    def _local_status(self) -> dict[str, Any]:
        """The local models: configured, loaded (memory in MiB, as local.memory_budget_mb counts it), unusable,
        their speed, the prompt readings a cancel stopped, and the dialogue cache."""
        local = self.config.local
        return {
            "default": local.default,
            "models": [m.name for m in local.models],
            "resident": self.zoo.resident(),
            "resident_mb": round(self.zoo.resident_mb()),
            "memory_budget_mb": self.zoo.budget_mb,
            "unavailable": self.decider.unusable_files(),
            "tokens_per_s": self.local.tokens_per_s,
            "prompts_stopped": dataclasses.asdict(self.local.stopped_readings),
            "cache": self.zoo.cache.status(),
        }

    def _cloud_status(self) -> dict[str, Any]:
        """The cloud models, their endpoints' breakers, today's spend and answers, and where keys come from."""
        cloud = self.config.cloud
        return {
            "models": [m.name for m in cloud.models],
            "default": cloud.default,
            "breaker": self.cloud.breaker_state,
            "breakers": {redacted_url(url): b.state for url, b in self.cloud.endpoint_breakers().items()},
            "spent_today_usd": round(self.records.spent_today(), 6),
            "held_usd": round(self.records.today.held(), 6),
            "daily_cap_usd": cloud.daily_cap_usd,
            "answered_today": self.records.answered_today(),
            "no_api_key": self.cloud.keyless,
            "key_from_env": self.cloud.key_from_env,
        }

    def in_flight(self) -> int:
        """Turns not answered yet (a turn's learning step may still run after its `done` frame). Read from a
        copy of the turns taken in one step, so the metrics' thread may ask too."""
        return sum(not reply.answered.is_set() for _, reply in list(self._turns.values()))

    def _routing_status(self) -> dict[str, Any]:
        return {**self.decider.status(), **self.learner.status()}

    def _status_line(self) -> str:
        """The one line systemd shows for the daemon (``systemctl status``), renewed every 10 s."""
        routing = self._routing_status()
        online = self.telemetry.snapshot().online
        net = "online" if online else "offline" if online is False else "network unknown"
        default, resident = self.config.local.default, self.zoo.resident()
        loaded = "" if resident == [default] else f" (default; loaded: {', '.join(resident) or 'none'})"
        return (
            f"model {default}{loaded}, {net}, mode {routing['mode']}, "
            f"SLA {or_na(routing['attained'], '{}')}/{routing['sla']}, Q {routing['q']:.2f}, "
            f"{self.in_flight()} in flight"
        )

    def _on_signals(self) -> None:
        """The signals since the last pass, each kind acted on once: a flood of SIGHUPs (a config tool, a
        script in a loop) reloaded once per signal, the loop answering nothing meanwhile. Those that came
        while a reload ran are read at the next pass and reload once more, so the config last written wins."""
        received = self._drain_signals()
        if signal.SIGHUP in received:
            self.reload()
        for signum in received:
            if signum in (signal.SIGTERM, signal.SIGINT) and self.stopping_since is None:
                log.info(
                    "stopping: finishing %d turns in flight (grace %.0f s)",
                    len(self._turns),
                    self.config.daemon.shutdown_grace_s,
                )
                self.notifier.stopping()
                self.stopping_since = time.monotonic()

    def _drain_signals(self) -> set[int]:
        """Every signal number the wakeup socket holds (the C handler writes one byte per signal)."""
        received: set[int] = set()
        with contextlib.suppress(BlockingIOError):
            while data := self._wake_r.recv(4096):
                received.update(data)
        return received

    def reload(self) -> dict[str, Any]:
        """Re-read the config and the policy; a config that fails validation is rejected, the old one kept.
        Returns the `reload` op's reply (docs/protocol.md) but for its ``config``.

        Routing, cloud, attachments, log settings and local models (a pulled model, a new default) apply at
        once, and the doors' key files are read again. What ``AS_STARTED`` and ``AS_STARTED_KEYS`` name (paths,
        the doors' sockets and limits, telemetry readers, the disk park's size) stays as started: a change there
        is logged and waits for a restart.
        """
        self.notifier.reloading()
        try:
            new = load_config(self._config_path, overrides=self._overrides)
            check_chat_formats(new)
            check_model_file(new.local_model(new.local.default), self.config.models_dir)
            http_key, secret = self._read_door_keys()
            self.cloud.reconfigure(new.cloud, new.source)  # reads the API keys: the last step that can reject
        except LocodError as exc:
            self._rejections.say(
                exc.message, logging.ERROR, "reload rejected, keeping the running configuration: %s", exc.message
            )
            self.notifier.ready(self._status_line())
            return {
                "reloaded": False,
                "error": exc.message,
                "restart_needed": [],
                "policy_error": None,
                "left_out": {},
                "models_changed": [],  # every field of an accepted reload's reply, as docs/protocol.md lists them
            }
        new, kept = _as_started(new, self.config)
        if kept:
            log.warning("reload: [%s] changed and take(s) effect at the next restart", "], [".join(kept))
        self.config, self.restart_needed = new, kept
        self.tcp_auth = TcpAuth(secret)
        if self.http is not None:
            self.http.reloaded(http_key)
        models_changed = self.zoo.reconfigure(new.local)
        self.runner.config = self.shadow.config = new
        self.telemetry.retarget(new)
        policy_error = self.decider.reload(new)
        configure_logging(new.log.level)
        log.info("configuration reloaded from %s", new.source)
        # A rejection after this line is news, however recently it was said: else a file broken again the
        # same way left "reloaded" the log's last word while the file on disk would not start the daemon.
        self._rejections = Throttle(log)
        self.notifier.ready(self._status_line())
        left_out = {name: error.message for name, error in self.decider.left_out_files().items()}
        return {
            "reloaded": True,
            "error": None,
            "restart_needed": kept,
            "policy_error": policy_error,
            "left_out": left_out,  # local models routing leaves out: a typo in a path said only "reloaded"
            "models_changed": models_changed,  # after editing several models: what the daemon took of it
        }

    def _stop_step(self, now: float) -> bool:
        """Called each loop pass while stopping; True once everything is finished and flushed."""
        assert self.stopping_since is not None
        if self._turns and now - self.stopping_since > self.config.daemon.shutdown_grace_s:
            for _, reply in self._turns.values():
                reply.cancel_reason = "the daemon is shutting down"
                reply.cancelled.set()
        if self._turns:
            return False
        with self._admitting_lock:
            self._admitting = False
        self._admit_handed_in()  # what came in since the last pass: refused, the daemon is stopping
        self._drain_outbox()
        return True

    def close(self) -> None:
        """Release everything ``start`` took, after the last turn: labels written, states parked, sockets closed."""
        if self.http is not None:
            self.http.stop()  # after the turns ended, so their last frames reach the HTTP clients
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.runner.close()
        self._feedback.shutdown(wait=True)  # labels sent before the stop are written and answered
        self._drain_outbox()
        self.telemetry.stop()
        self.shadow.close()
        self.learner.close()
        self.cloud.close()
        self.zoo.close()
        self.records.close()
        for guard in self.guards.values():
            guard.close()
        self.ctx.destroy(linger=0)
        if IPC in self.sockets and self._holds_runtime():  # ours: a stale file would make clients wait
            self.config.socket_path.unlink(missing_ok=True)
        self.notifier.close()
        flush_throttles()  # a flood's count held back within its interval: the process ends before the interval
        log.info("stopped after %d turns", self.turns_served)  # a log that ends here was not a crash


def _as_started(new: Config, running: Config) -> tuple[Config, list[str]]:
    """``new`` with what a reload cannot apply (AS_STARTED, AS_STARTED_KEYS) as ``running`` has it, so that
    status and `config show` say what is in force; and the sections and keys whose change waits for a restart."""
    kept = [name for name in AS_STARTED if getattr(new, name) != getattr(running, name)]
    new = dataclasses.replace(new, **{name: getattr(running, name) for name in AS_STARTED})
    for section, key in AS_STARTED_KEYS:
        started = getattr(getattr(running, section), key)
        if getattr(getattr(new, section), key) != started:
            kept.append(f"{section}.{key}")
            new = dataclasses.replace(new, **{section: dataclasses.replace(getattr(new, section), **{key: started})})
    return new, kept


# What a second `locod serve` (a second quickstart.sh run after a `locod stop` that has not finished, a shell
# besides the service) is told to do about the daemon that holds its directory.
TAKEN_AT_START = (
    ": `locod status` shows it and `locod stop` stops it; a second daemon needs its own paths.state_dir and "
    "paths.runtime_dir"
)


def _exclusive_lock(directory: Path, advice: str = "") -> IO[str]:
    """Hold ``directory/locod.lock`` for the daemon's life: one daemon per state and runtime directory;
    ``advice`` follows the refusal when another holds it."""
    make_private_dir(directory)
    path = directory / "locod.lock"
    try:  # non-blocking: a FIFO there, opened to write, waited for a reader for good, and the start with it
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, 0o600)
    except OSError as exc:  # EISDIR, ENXIO: a directory or a socket there
        raise (_not_a_lock(path) if exc.errno in (errno.EISDIR, errno.ENXIO) else unwritable(directory, exc)) from None
    handle = os.fdopen(fd, "w")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        handle.close()
        raise _not_a_lock(path)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StorageError(
            f"another locod daemon is already running with {directory}{advice}", code="already_running"
        ) from None
    return handle


def _not_a_lock(path: Path) -> StorageError:
    return StorageError(
        f"{path} is not a regular file (a FIFO, socket, device or directory put there): the daemon's lock "
        "cannot be taken there; remove it and start again",
        code="state_unwritable",
    )


def _bind_tcp(sock: zmq.Socket[bytes], endpoint: str) -> None:
    """Bind the tcp endpoint; one it cannot (a port another program holds, an address not this host's) is a
    one-line ConfigError, as http.listen's is: ZeroMQ's error ended the start in a traceback."""
    sock.setsockopt(zmq.IPV6, ipv6(endpoint))
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        why = str(exc) if exc.errno is None else zmq.strerror(exc.errno)  # without pyzmq's "(addr=...)"
        raise ConfigError(
            f"daemon.tcp: cannot serve on {endpoint} ({why}): another program (or another "
            "locod) may hold the port; choose another one, or stop that program",
            code="tcp_bind",
        ) from None


def _http_server(daemon: Daemon) -> HttpServer:
    """The HTTP door, from the optional ``locod[http]`` extra: without it, one line that says how to add it."""
    try:
        from locod.daemon.httpapi import HttpServer
    except ImportError as exc:
        raise ConfigError(
            f"http.listen is {daemon.config.http.listen!r}, but the HTTP API needs the http extra ({exc.name} is "
            f"missing): {install_hint('http')}, or unset http.listen"
        ) from None
    return HttpServer(daemon)
