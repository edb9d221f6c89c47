"""The OpenAI-compatible HTTP API (docs/http.md): a Starlette app that uvicorn serves in a thread of the
daemon, beside the ZeroMQ loop. Needs the ``locod[http]`` extra.

A chat completion is translated (``openai_wire.py``) into a ``ChatRequest`` and handed to the daemon's loop
(``Daemon.hand_in``), which admits it as it admits a socket's turn: the same queue limit, shutdown and
``TurnRunner.run``. The turn's frames come back through its ``Reply`` into this thread's event loop and
leave as one JSON body or as server-sent events. Nothing here decides where a turn runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Container
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from locod.daemon import metrics
from locod.daemon import openai_wire as wire
from locod.daemon.config import ROUTED_MODEL, Config, split_listen
from locod.daemon.conversations import Conversations
from locod.daemon.decision import Offered
from locod.daemon.fdlimit import HTTP_SHARE, door_share, raise_soft_limit
from locod.daemon.httpconn import Limits, PerRequestWarnings, loop_errors, protocol
from locod.daemon.httporigin import Gate, cross_origin
from locod.daemon.keyfile import http_api_key
from locod.daemon.modelfile import resolve_path
from locod.daemon.reply import Reply
from locod.daemon.sessions import HTTP
from locod.errors import ConfigError
from locod.protocol import (
    ChatRequest,
    DecisionFrame,
    DeltaFrame,
    DoneFrame,
    ErrorFrame,
    EscalatedFrame,
    FallbackFrame,
    Frame,
    as_json,
    lone_surrogate_at,
    not_text,
    read_json,
)

if TYPE_CHECKING:
    from locod.daemon.server import Daemon

log = logging.getLogger(__name__)
Handler = Callable[[Request], Awaitable[Response]]
LOCATION_AFTER: dict[type, str] = {EscalatedFrame: "cloud", FallbackFrame: "local"}
# How long a stream's headers wait for its first text (or its escalation, its early failure) so that they say
# where the answer comes from and a failure before any text gets its HTTP status; then they go as decided,
# and sse-starlette's pings (every 15 s) keep the connection alive.
HEAD_WAIT_S = 15.0


@dataclass
class Exchange:
    """One chat completion in flight: what was asked, and the frames its turn sends back."""

    completion: wire.Completion
    frames: asyncio.Queue[Frame]
    reply: Reply
    decision: DecisionFrame | None = None
    fallback: str | None = None
    escalated: str | None = None
    escalated_notice: str | None = None  # what the escalation tells the user of the cloud's answer (its images)
    location: str = ""  # where the answer comes from, as far as known: the decision's until a frame moves it
    model: str = ""  # and which model writes it
    id: str = field(default_factory=lambda: "chatcmpl-" + uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))  # one for the answer and all its chunks

    def follow(self, frame: Frame) -> None:
        """Keep what a frame says of the answer: where it now comes from and which model writes it (after an
        escalation to the cloud, a fallback to the local model, the finished turn), and what a fallback or an
        escalation says, which the answer's opening, notice and extension tell."""
        if isinstance(frame, FallbackFrame):
            self.fallback = frame.message
        elif isinstance(frame, EscalatedFrame):
            self.escalated, self.escalated_notice = frame.message, frame.notice
        if isinstance(frame, (EscalatedFrame, FallbackFrame, DoneFrame)):
            self.location = frame.location if isinstance(frame, DoneFrame) else LOCATION_AFTER[type(frame)]
            self.model = frame.model

    def headers(self) -> dict[str, str]:
        """The turn's headers: ``x-request-id`` is the completion's id, which the SDKs keep as a reply's
        ``_request_id`` and an error's ``request_id`` (and ``locod decisions`` takes); once decided, the
        decision's id and where the answer comes from."""
        identified = {"x-request-id": self.id}
        if self.decision is None:  # refused before its decision (busy, an attachment that is no image): no record
            return identified
        location = self.location or self.decision.location
        return {"x-locod-decision": str(self.decision.decision), "x-locod-location": location, **identified}

    def chunk(self, model: str, delta: dict[str, Any], reason: str | None = None, **extra: Any) -> dict[str, Any]:
        """One chunk; with ``include_usage``, as OpenAI's, each carries ``usage``: null until the last one's."""
        if self.completion.include_usage:
            extra = {"usage": None, **extra}
        return wire.chunk(self.id, self.created, model, delta, reason, **extra)

    @property
    def notice(self) -> str | None:
        """The notice of the answer given: the decision's (an image the model could not see, a cloud asked
        for that was blocked), or an escalation's for the cloud's answer; the decision's was for the local
        answer the escalation dropped, which a failed cloud brings back (shown or made again)."""
        assert self.decision is not None
        cloud_answers = self.escalated is not None and self.fallback is None
        return self.escalated_notice if cloud_answers else self.decision.notice

    def opening(self) -> str:
        """What the answer's text starts with, which a chat UI shows (it shows nothing of ``locod``): its
        notice, or a fallback's message (the cloud failed before any text: the local model answers). An answer
        asked for as JSON (``response_format``) starts with nothing: a client parses it whole (the SDKs'
        ``parse``), and the notice is in the ``locod`` object."""
        if self.completion.options.response_format is not None:
            return ""
        notice = self.fallback if self.fallback is not None else self.notice
        return wire.notice_line(notice) if notice else ""

    def extension(self, done: DoneFrame | None) -> dict[str, Any]:
        assert self.decision is not None
        return wire.extension(self.decision, done, self.fallback, self.escalated, self.notice)


class HttpServer:
    """The HTTP door: its routes, each guarded (``_guarded``), served by uvicorn on a thread of its own."""

    def __init__(self, daemon: Daemon) -> None:
        cfg = daemon.config.http
        host, port = split_listen(cfg.listen)
        self.key = http_api_key(daemon.config)  # a reload reads it again (Daemon.reload)
        self.daemon = daemon
        self._offered_since: dict[str, int] = {}  # each model name: when the running daemon began offering it
        self._offer(daemon.config)
        kept_in = daemon.config.state_dir / "conversations.json" if daemon.config.local.cache_disk_mb else None
        self.conversations = Conversations(daemon.sessions, cfg.max_conversations, kept_in=kept_in)
        self.registry = metrics.registry(daemon)
        self.gate = Gate(host, cfg.cors_origins)
        connections = door_share("http.max_connections", cfg.max_connections, raise_soft_limit(), HTTP_SHARE)
        self.limits = Limits(connections, cfg.request_timeout_s)
        # A thread for each request of a named session waiting for its turn: each holds a connection, so there
        # are never more than the door's connections, and none waits for a thread (asyncio's default executor
        # has a few, which the waits of sessions whose turns answer slowly would all hold).
        self._session_waits = ThreadPoolExecutor(self.limits.max_connections, thread_name_prefix="http-session")
        logging.getLogger("uvicorn.error").addFilter(PerRequestWarnings(self.limits.throttle))
        routes = [
            Route("/v1/chat/completions", self._guarded(self.chat), methods=["POST"]),
            Route("/v1/models", self._guarded(self.models), methods=["GET"]),
            Route("/v1/models/{model:path}", self._guarded(self.model), methods=["GET"]),
            Route("/metrics", self._guarded(self.metrics), methods=["GET"]),
            Route("/health", self._guarded(self.health, keyed=False), methods=["GET"]),
        ]
        config = uvicorn.Config(  # log_config=None: uvicorn's lines go through locod's own logging
            _identified(
                _one_framing(
                    _origin_form(
                        cross_origin(
                            _tidy_path(
                                Starlette(routes=routes, exception_handlers={404: self.no_route, 405: self.no_route})
                            ),
                            cfg.cors_origins,
                            "x-locod-decision, x-locod-location, x-request-id",
                        )
                    )
                )
            ),
            host=host,
            port=port,
            http=protocol(self.limits),  # bounded connections, timed requests (httpconn.py)
            # No WebSockets, whatever is installed: with the websockets package there, uvicorn handed an upgrade
            # request's connection to its own protocol, out of the door's count for good (its slot never freed)
            ws="none",
            backlog=self.limits.accept_batch(),
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._serve, name="http", daemon=True)
        self.listen = cfg.listen

    def start(self) -> None:
        """Serve, and return once the port is bound (a ConfigError if it cannot be)."""
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"http.listen: cannot serve HTTP on {self.listen}{self._why()}", code="http_bind")
            time.sleep(0.01)
        log.info("OpenAI-compatible HTTP API on http://%s/v1%s", self.listen, " (bearer key)" if self.key else "")

    def _why(self) -> str:
        """Why the address could not be served, asked again once uvicorn gave up (it logs why and ends its
        thread): a port another program holds, an address not of this machine."""
        host, port = split_listen(self.listen)
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            try:
                probe.bind((host, port))
            except OSError as exc:
                held = " (another program, another locod?): set http.listen to a free port"
                return f": {exc.strerror}" + (held if exc.errno == errno.EADDRINUSE else "")
        return " (see the log)"

    def _serve(self) -> None:
        async def serve() -> None:
            asyncio.get_running_loop().set_exception_handler(loop_errors(self.limits.throttle))
            await self.server.serve()

        asyncio.run(serve())

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=10)
        self._session_waits.shutdown(wait=False, cancel_futures=True)
        self.conversations.save()

    def reloaded(self, key: str | None) -> None:
        """A reload took up a new configuration: its key file, read again, and the models it offers."""
        self.key = key
        self._offer(self.daemon.config)

    def _offer(self, config: Config) -> None:
        """Keep when each model name of ``config`` was first offered (now, for a name the last configuration
        had not): a cloud model's ``created`` in ``GET /v1/models``, which a reload that keeps it keeps."""
        now = int(time.time())
        names = [ROUTED_MODEL, *(m.name for m in config.local.models), *(m.name for m in config.cloud.models)]
        self._offered_since = {name: self._offered_since.get(name, now) for name in names}

    def model_names(self) -> list[str]:
        cfg = self.daemon.config
        return [m.name for m in cfg.local.models] + [m.name for m in cfg.cloud.models]

    # -- the door ------------------------------------------------------------------------------------

    def _guarded(self, handler: Handler, keyed: bool = True) -> Handler:
        """Who may ask (the Host, Origin and Content-Type a web page cannot fake, httporigin.py; the bearer
        key, in constant time), and every HttpError as OpenAI's error body."""

        async def guarded(request: Request) -> Response:
            try:
                self.gate.check(request.method, request.headers)
                if keyed and self.key is not None:
                    scheme, _, given = request.headers.get("authorization", "").partition(" ")
                    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), self.key.encode()):
                        raise wire.HttpError(401, "a valid 'Authorization: Bearer <key>' is required", "unauthorized")
                return await handler(request)
            except wire.HttpError as exc:
                return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())

        return guarded

    async def _body(self, request: Request) -> Any:
        limit = self.daemon.config.daemon.max_message_bytes
        over = f"the body is over the limit of {limit} bytes (daemon.max_message_bytes)"
        if int(request.headers.get("content-length") or 0) > limit:
            raise wire.HttpError(413, over, "too_large")
        raw = bytearray()
        try:
            async for piece in request.stream():
                raw += piece
                if len(raw) > limit:
                    raise wire.HttpError(413, over, "too_large")
        except ClientDisconnect:  # it hung up, or sent too slowly and was closed (http.request_timeout_s)
            raise wire.HttpError(400, "the client left before its body was complete", "client_gone") from None
        try:
            body = read_json(raw)
        except (ValueError, RecursionError) as exc:
            raise wire.bad(f"the body is not valid JSON: {exc}", code="invalid_json") from None
        where = lone_surrogate_at(raw, body)
        if where is not None:
            raise wire.bad(not_text(where), param=where or None, code="bad_request")
        return body

    # -- routes --------------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        if self.daemon.stopping_since is not None:
            return JSONResponse(wire.HttpError(503, "the daemon is shutting down", "shutting_down").body(), 503)
        return JSONResponse({"status": "ok"})

    def _model_list(self, left_out: Container[str]) -> list[dict[str, Any]]:
        """The models a client may name: a local model ``left_out`` for its file is not listed, as routing
        leaves it out, and offered again once the file is there. ``created`` (OpenAI's Unix time) is a local
        model's file's modification time, when it came onto the device; for ``auto`` and a cloud model (and
        a local file that cannot be read), when this daemon began offering it."""
        cfg, since = self.daemon.config, self._offered_since
        now = int(time.time())  # a name a reload added, asked before the reload's own stamp is in
        models = [(ROUTED_MODEL, "locod", since.get(ROUTED_MODEL, now))]
        for local in cfg.local.models:
            if local.name not in left_out:
                file = resolve_path(local, cfg.models_dir)
                models.append((local.name, "locod-local", _modified(file, since.get(local.name, now))))
        models += [(m.name, "locod-cloud", since.get(m.name, now)) for m in cfg.cloud.models]
        return [{"id": name, "object": "model", "created": at, "owned_by": owner} for name, owner, at in models]

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": self._model_list(self.daemon.decider.left_out_files())})

    async def model(self, request: Request) -> Response:
        """``GET /v1/models/{id}``: what the SDKs' ``models.retrieve`` and editor plugins ask first."""
        name = request.path_params["model"]
        left_out = self.daemon.decider.left_out_files()
        if name in left_out:
            raise wire.HttpError(404, left_out[name].message, left_out[name].code)
        served = self._model_list(left_out)
        found = next((m for m in served if m["id"] == name), None)
        if found is None:
            raise wire.unknown_model(name, [m["id"] for m in served[1:]], Offered.of(self.daemon.config), left_out)
        return JSONResponse(found)

    async def no_route(self, request: Request, exc: Exception) -> Response:
        """A path or method this API does not serve, in OpenAI's error shape (an SDK shows its message), saying
        what is served: the usual slip is a base_url without ``/v1``."""
        status = getattr(exc, "status_code", 404)
        served = "POST /v1/chat/completions, GET /v1/models, GET /metrics, GET /health"
        origin = request.headers.get("origin")
        if request.method == "OPTIONS" and origin and "access-control-request-method" in request.headers:
            why = (  # a web chat UI's developer reads this in the browser's network panel, beside "CORS error"
                f"a browser's CORS preflight from {as_json(origin, 200)} is granted only to the origins named in "
                "http.cors_origins: name that page's origin there to let it call the API (docs/http.md, Web pages)"
            )
        else:
            why = f"it serves {served} (an OpenAI client's base_url ends in /v1)"
        error = wire.HttpError(
            status,
            f"locod serves no {request.method} {request.url.path[:200]}: {why}",
            "not_found" if status == 404 else "method_not_allowed",
        )
        return JSONResponse(error.body(), status_code=status, headers=getattr(exc, "headers", None))

    async def metrics(self, request: Request) -> Response:
        return Response(await run_in_threadpool(generate_latest, self.registry), media_type=CONTENT_TYPE_LATEST)

    async def chat(self, request: Request) -> Response:
        body, left_out = await self._body(request), self.daemon.decider.left_out_files  # asked of a refusal only
        completion = wire.parse_completion(body, self.model_names(), Offered.of(self.daemon.config), left_out)
        named = _session_header(request)
        loop = asyncio.get_running_loop()
        frames: asyncio.Queue[Frame] = asyncio.Queue()

        def post(frame: Frame) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop is gone: the server stopped
                loop.call_soon_threadsafe(frames.put_nowait, frame)

        reply = Reply(post=post, cancel_reason="the HTTP client disconnected")
        if named is not None:
            await self._session_turn(named, reply, request)
        session, messages = self.conversations.continuing(completion.messages, named, reply.answered)
        exchange = Exchange(completion, frames, reply)
        chat = ChatRequest(exchange.id, messages, session, completion.model, completion.attachments, completion.options)
        self.daemon.hand_in(_client_key(request), chat, reply)
        try:
            first = await self._next(exchange, request)
            if isinstance(first, ErrorFrame):
                raise wire.error_of(first)
            assert isinstance(first, DecisionFrame)
            exchange.decision = first
            if completion.options.stream:
                held = await self._before_text(exchange, request)
                # sep: events end in a blank line of bare newlines, as OpenAI's own do; sse-starlette's default CRLF
                # lines are valid SSE, yet a client that splits the body on "\n\n" never finds an event end
                events = self._events(exchange, held)
                return EventSourceResponse(events, headers=exchange.headers(), ping=15, sep="\n")
            body = await self._whole(exchange, request)
        except wire.HttpError as exc:  # its failure names the turn (its record, once decided), as an answer would
            exc.turn_headers = exchange.headers()
            raise
        return JSONResponse(body, headers=exchange.headers())

    async def _session_turn(self, named: str, reply: Reply, request: Request) -> None:
        """Wait until the named session's earlier turns have answered (its turns run in arrival order, each
        seeing the answers before it), so what the session holds is read after them; a client that leaves
        meanwhile gives up its place. The wait is the socket's (``SessionStore.wait_turn``: asleep on the
        answer of the turn just ahead), on a thread of its own, while the event loop listens for the hang-up."""
        sessions, owner = self.daemon.sessions, self.conversations.owner
        sessions.enter(named, owner, reply.answered)
        waiting = asyncio.get_running_loop().run_in_executor(
            self._session_waits, sessions.wait_turn, named, owner, reply.answered, reply.cancelled
        )
        leaving = asyncio.ensure_future(_hang_up(request))
        try:
            await asyncio.wait((waiting, leaving), return_when=asyncio.FIRST_COMPLETED)
            if not waiting.done():
                raise wire.HttpError(400, "the client left before its session's turn came", "client_gone")
            waiting.result()
        except BaseException:  # its place would hold the session's later turns for good
            reply.cancelled.set()  # its wait's thread returns within a step (WAIT_STEP_S)
            sessions.leave(named, owner, reply.answered)
            raise
        finally:
            leaving.cancel()

    async def _before_text(self, exchange: Exchange, request: Request) -> list[Frame]:
        """A stream's frames up to its first text, read before its headers go (at most ``HEAD_WAIT_S``): an
        escalation held back the local text, so ``x-locod-location`` then says cloud, and a turn that fails
        before any text is answered with its HTTP status (429, 502, ...), which the SDKs raise and retry."""
        held: list[Frame] = []
        deadline = time.monotonic() + HEAD_WAIT_S
        while not held or not isinstance(held[-1], (DeltaFrame, DoneFrame)):
            try:
                frame = await asyncio.wait_for(self._next(exchange, request), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break
            if isinstance(frame, ErrorFrame):
                raise wire.error_of(frame)
            exchange.follow(frame)
            held.append(frame)
        return held

    async def _next(self, exchange: Exchange, request: Request) -> Frame:
        """The turn's next frame; a client that hung up meanwhile cancels the turn."""
        while True:
            try:
                return await asyncio.wait_for(exchange.frames.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    exchange.reply.cancelled.set()

    async def _whole(self, exchange: Exchange, request: Request) -> dict[str, Any]:
        while True:
            frame = await self._next(exchange, request)
            exchange.follow(frame)
            if isinstance(frame, ErrorFrame):
                raise wire.error_of(frame)
            if isinstance(frame, DoneFrame):
                text = frame.text or ""
                self._answered(exchange, frame, text)
                reason = self._finish_reason(exchange, frame)
                shown = exchange.opening() + text
                return wire.completion(exchange.id, exchange.created, shown, frame, reason, exchange.extension(frame))

    async def _events(self, exchange: Exchange, held: list[Frame]) -> AsyncIterator[str]:
        """Server-sent events until ``[DONE]``: the ``held`` frames (read before the headers), then the rest;
        leaving early (the client hung up) cancels the turn."""
        assert exchange.decision is not None
        model = exchange.model or exchange.decision.model  # an escalation held before the headers
        parts: list[str] = []  # the answer's text as sent, the notice line left out
        try:
            yield json.dumps(exchange.chunk(model, {"role": "assistant", "content": ""}))
            while True:
                frame = held.pop(0) if held else await exchange.frames.get()
                if isinstance(frame, DeltaFrame):
                    shown = frame.text if parts else exchange.opening() + frame.text  # the first text: the notice
                    parts.append(frame.text)  # what the answer's next request repeats, the notice taken off
                    yield json.dumps(exchange.chunk(model, {"content": shown}))
                elif isinstance(frame, FallbackFrame):
                    exchange.follow(frame)
                    model = frame.model
                    if parts:  # the cloud's text went out and cannot be taken back: say where it breaks off
                        parts.append(wire.broke_off(frame.message))  # all the client got: what it sends back
                        yield json.dumps(exchange.chunk(model, {"content": parts[-1]}))
                elif isinstance(frame, EscalatedFrame):  # no local text was sent: the cloud's answer follows
                    exchange.follow(frame)
                    model = frame.model
                elif isinstance(frame, ErrorFrame):
                    yield json.dumps(wire.error_of(frame).body())
                    return
                elif isinstance(frame, DoneFrame):
                    if not parts and (opening := exchange.opening()):  # an empty answer is told the notice too
                        yield json.dumps(exchange.chunk(model, {"content": opening}))
                    for event in self._ending(exchange, frame, "".join(parts)):
                        yield event
                    return
        finally:
            if not exchange.reply.answered.is_set():
                exchange.reply.cancelled.set()

    def _ending(self, exchange: Exchange, done: DoneFrame, text: str) -> list[str]:
        self._answered(exchange, done, text)
        reason = self._finish_reason(exchange, done)
        events = [exchange.chunk(done.model, {}, reason, locod=exchange.extension(done))]
        if exchange.completion.include_usage:
            events.append({**exchange.chunk(done.model, {}), "choices": [], "usage": wire.usage(done)})
        return [json.dumps(e) for e in events] + ["[DONE]"]

    def _finish_reason(self, exchange: Exchange, done: DoneFrame) -> str:
        cfg = self.daemon.config
        local = next((m for m in cfg.local.models if m.name == done.model), None) if done.location == "local" else None
        options = exchange.completion.options
        return wire.finish_reason(done, options, cfg.local.max_tokens, local.n_ctx if local else None)

    def _answered(self, exchange: Exchange, done: DoneFrame, text: str) -> None:
        self.conversations.answered(exchange.completion.messages, wire.as_held(text), done.session)


def _tidy_path(app: ASGIApp) -> ASGIApp:
    """Serve a path with doubled or trailing slashes as the path: ``/v1//chat/completions`` (a base_url
    ending in ``/`` joined by hand), ``POST /v1/chat/completions/``, ``GET /v1/models/``. Starlette would
    answer a trailing slash with a bodiless 307, which curl and urllib do not follow for a POST, to a
    Location built from the request's Host; and take ``/v1/models/`` for a model named ''."""

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = {**scope, "path": "/" + "/".join(part for part in scope["path"].split("/") if part)}
        await app(scope, receive, send)

    return asgi


def _one_framing(app: ASGIApp) -> ASGIApp:
    """Refuse a request whose headers can be read two ways, and close its connection: one that names both
    Content-Length and Transfer-Encoding (RFC 9112, 6.3), which h11 reads as chunked and kept the connection,
    so behind a proxy that goes by the Content-Length, what the proxy sent as one request's body was read here
    as the next request on the connection (request smuggling); and one with more than one Origin, whose first
    passed the Gate while the CORS answer went by the last."""

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        why = _ambiguity([key for key, _ in scope["headers"]]) if scope["type"] == "http" else None
        if why is None:
            await app(scope, receive, send)
            return
        error = wire.HttpError(400, why, "bad_request")
        await JSONResponse(error.body(), status_code=400, headers={"connection": "close"})(scope, receive, send)

    return asgi


def _ambiguity(names: list[bytes]) -> str | None:
    """Why headers named ``names`` can be read two ways (None: they cannot)."""
    if {b"content-length", b"transfer-encoding"} <= set(names):
        return (
            "the request names both Content-Length and Transfer-Encoding, so where its body ends is ambiguous: "
            "send one of them"
        )
    if names.count(b"origin") > 1:
        return f"the request names Origin {names.count(b'origin')} times, so whose page sent it is ambiguous: send one"
    return None


def _origin_form(app: ASGIApp) -> ASGIApp:
    """Serve a request whose target is a whole URL, ``GET http://127.0.0.1:8080/v1/models`` (absolute-form,
    which RFC 9112, 3.2.2, says a server must accept, as a proxy-minded client sends it), as its path, with
    the URL's authority as its Host (the Gate then checks that one); a target that is neither a path nor an
    http(s) URL (``*``, ``host:port``) is refused by name rather than answered 404 for a path it is not."""

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        target = scope["raw_path"].decode("latin-1") if scope["type"] == "http" else "/"
        if target.startswith("/"):
            await app(scope, receive, send)
            return
        url = urlsplit(target)
        if url.scheme.lower() not in ("http", "https") or not url.netloc:
            error = wire.HttpError(
                400,
                f"the request target {as_json(target)} is neither a path (/v1/models) nor an http URL (absolute-form)",
                "bad_request",
            )
            await JSONResponse(error.body(), status_code=400)(scope, receive, send)
            return
        headers = [(k, v) for k, v in scope["headers"] if k != b"host"] + [(b"host", url.netloc.encode("latin-1"))]
        path = url.path or "/"
        scope = {**scope, "path": unquote(path), "raw_path": path.encode("latin-1"), "headers": headers}
        await app(scope, receive, send)

    return asgi


def _identified(app: ASGIApp) -> ASGIApp:
    """Every reply with an ``x-request-id``, which the SDKs keep as an error's ``request_id``: a turn's own
    (its completion's id), else a fresh one, for a refusal before any turn (a bad body, an unknown model, a
    missing key) as for ``GET /v1/models`` and a CORS preflight."""

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        async def identified(message: Message) -> None:
            headers = message.get("headers", [])
            if message["type"] == "http.response.start" and not any(k == b"x-request-id" for k, _ in headers):
                message = {**message, "headers": [*headers, (b"x-request-id", wire.request_id().encode())]}
            await send(message)

        await app(scope, receive, identified if scope["type"] == "http" else send)

    return asgi


def _modified(path: Path, otherwise: int) -> int:
    """A file's modification time as a Unix time, or ``otherwise`` when it cannot be read (the default model's
    file gone, which stays listed: its turns fail by name)."""
    try:
        return int(path.stat().st_mtime)
    except OSError:
        return otherwise


def _session_header(request: Request) -> str | None:
    """The ``x-locod-session`` a client named, as the text it sent: HTTP carries a header's bytes, which
    Starlette reads as Latin-1, so ``café`` sent as UTF-8 (every HTTP library's way) would be recorded and
    continued as ``cafÃ©``, and 60 emoji counted as 240 characters: a session's name is read as UTF-8 and
    measured in characters, as the socket's ``session`` is (docs/protocol.md)."""
    raw = request.headers.get("x-locod-session")
    if raw is None:
        return None
    try:
        named = raw.encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        raise wire.bad("x-locod-session must be UTF-8 text", "x-locod-session") from None
    if not 0 < len(named) <= 200:
        raise wire.bad("x-locod-session must be 1 to 200 characters", "x-locod-session")
    return named


def _client_key(request: Request) -> bytes:
    """Who a turn is for, in ``daemon.max_turns_per_client``: one HTTP connection, as one socket connection
    is, not one host: every local tool (or everything behind one proxy) shares 127.0.0.1."""
    client = request.client
    return HTTP + (f"{client.host}:{client.port}" if client else "").encode()


async def _hang_up(request: Request) -> None:
    """Return once the client has hung up: its body read, all its request receives is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
