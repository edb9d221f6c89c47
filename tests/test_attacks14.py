"""Attack round 14: many clients at once, clients that leave at bad moments, and stops while they talk
(docs/reliability.md, "Concurrency, cancellation and stops"). Real daemon, real model, real sockets."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zmq

from locod.daemon.backends import Generation, Prompt
from locod.daemon.cloud import CloudBackend
from locod.daemon.config import load_config
from locod.daemon.peerlink import Link
from locod.daemon.walkaway import Streamed, run_leaving_on_cancel

from .conftest import SECRET, Context, DaemonHandle, cloud_config, free_port, wait_for, write_config

SAY_HI = {"model": "auto", "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}


def dealer(handle: DaemonHandle, ctx: Context) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)  # closed at once: what a client that goes away does
    sock.connect(handle.endpoint)
    return sock


def send(sock: zmq.Socket[bytes], request_id: str, op: str, **fields: Any) -> None:
    sock.send(json.dumps({"v": 1, "id": request_id, "op": op, **fields}).encode())


def receive(sock: zmq.Socket[bytes]) -> dict[str, Any]:
    assert sock.poll(300_000), "nothing from the daemon for 300 s"
    frame: dict[str, Any] = json.loads(sock.recv())
    return frame


def status(handle: DaemonHandle, ctx: Context) -> dict[str, Any]:
    sock = dealer(handle, ctx)
    try:
        send(sock, "status", "status")
        data: dict[str, Any] = receive(sock)["data"]
        return data
    finally:
        sock.close()


def test_a_client_gone_while_its_turn_waits_for_the_model_is_neither_recorded_nor_run(
    daemon: DaemonHandle, ctx: Context
) -> None:
    """A socket client that sent a turn and closed while the turn waited for the local model behind another
    was not noticed until the turn's own `decision` frame failed: the turn was recorded as accepted, its
    whole prompt read by the model (seconds for a long one, every other client waiting), then `cancelled`.
    Thirty-two such turns per connection were thirty-two records and prompt reads for nobody (a turn asking
    for `queued` frames was found out by the next one, up to 30 s later). An HTTP client's hang-up was seen
    while it waited. Now the loop looks at the connections of waiting turns every
    second: the turn leaves the queue, refused like one that was never accepted, and writes nothing."""
    holder = dealer(daemon, ctx)
    send(holder, "holder", "chat", prompt="Write a very long story about a dragon.", options={"max_tokens": 1500})
    while receive(holder)["type"] != "delta":  # it holds the model
        pass
    leaver = dealer(daemon, ctx)
    send(leaver, "leaver", "chat", prompt="Say hi.")  # without `queued`, whose frames every 30 s would find it gone
    wait_for(lambda: status(daemon, ctx)["queue"]["waiting_for_local"] == 1, 60, "the turn to queue")
    leaver.close()
    wait_for(lambda: status(daemon, ctx)["queue"]["waiting_for_local"] == 0, 60, "the queued turn to leave")
    holder.close()
    wait_for(lambda: status(daemon, ctx)["queue"]["in_flight"] == 0, 120, "the holder's turn to end")
    assert [r["request_id"] for r in daemon.rows()] == ["holder"]  # cancelled, or done if it ended first


def test_a_look_at_a_descriptor_that_names_another_file_now_keeps_no_copy() -> None:
    """libzmq closes a gone client's descriptor, and the number is soon another connection's or file's: the
    serving loop's look at it (``Link.closed``, each second while the client's turns end) said so but kept
    the copy it looked through, a descriptor lost at each look, for the daemon's life."""
    ours, theirs = socket.socketpair()
    link = Link.of(ours.fileno())
    assert link is not None and not link.closed()
    with open(os.devnull, "rb") as other:
        os.dup2(other.fileno(), ours.detach())  # the number now names another file
        link_fd = link.fd
        try:
            before = len(os.listdir("/proc/self/fd"))
            assert all(link.closed() for _ in range(100))
            assert len(os.listdir("/proc/self/fd")) < before + 10  # a copy kept per look: 100 more
        finally:
            os.close(link_fd)
            theirs.close()


def test_http_requests_that_arrive_as_the_daemon_stops_are_answered(daemon_factory: Any) -> None:
    """A chat completion handed to the serving loop after its last pass (SIGTERM, the turns in flight just
    finished) was never admitted nor refused: its connection hung until the HTTP server's 10 s join gave up,
    then the process ended and the client saw the connection closed with no status (6 of about 600 requests
    of this flood), and the stop took 10 s longer. A turn handed in once the loop stops admitting is now
    refused 503 `shutting_down` at once, as during the grace."""
    port = free_port()
    handle = daemon_factory({"http": {"listen": f"127.0.0.1:{port}"}, "local": {"n_threads": 1}})
    body = json.dumps(SAY_HI).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    seen: Counter[str] = Counter()
    lock, answered_once, stop = threading.Lock(), threading.Event(), threading.Event()

    def flood() -> None:
        while not stop.is_set():
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=120)
            except OSError:
                outcome = "refused"  # the port is closed: the daemon is gone, or going
            else:
                with conn:
                    try:
                        conn.sendall(head.encode() + body)
                        reply = b"".join(iter(functools.partial(conn.recv, 65536), b""))
                        outcome = reply.split(b"\r\n", 1)[0].decode() or "closed without a status"
                    except ConnectionResetError:
                        outcome = "reset"  # still in the listen backlog when the port closed: never read
            with lock:
                seen[outcome] += 1
            if outcome.startswith("HTTP/1.1 200"):
                answered_once.set()

    threads = [threading.Thread(target=flood) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        assert answered_once.wait(120), "no answer from the HTTP door"
        wait_for(lambda: sum(seen.values()) >= 50, 120, "the flood to be under way")
        handle.proc.send_signal(signal.SIGTERM)
        assert handle.proc.wait(120) == 0
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert seen["closed without a status"] == 0, seen
    assert set(seen) <= {"HTTP/1.1 200 OK", "HTTP/1.1 503 Service Unavailable", "refused", "reset"}, seen
    assert "stopped after" in handle.log()


@dataclass
class SilentEndpoint:
    """A cloud endpoint that takes each request and never answers (a reasoning model still thinking, a
    stalled proxy), or falls silent once it sent ``opening``: the read waits for its timeout."""

    server: socket.socket
    asked: threading.Event = field(default_factory=threading.Event)
    held: list[socket.socket] = field(default_factory=list)
    opening: bytes = b""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.getsockname()[1]}/v1"

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.held.append(conn)
            if conn.recv(65536):
                conn.sendall(self.opening)
                self.asked.set()


@pytest.fixture
def silent_endpoint() -> Iterator[SilentEndpoint]:
    endpoint = SilentEndpoint(socket.create_server(("127.0.0.1", 0)))
    threading.Thread(target=endpoint.serve, daemon=True).start()
    yield endpoint
    endpoint.server.close()
    for conn in endpoint.held:
        conn.close()


def silent_cloud_daemon(factory: Any, endpoint: SilentEndpoint) -> DaemonHandle:
    """Every turn to the silent endpoint, whose reads would time out only after 600 s."""
    config = cloud_config(endpoint.base_url, timeout_s=600.0, deadline_s=1200.0, max_retries=0)
    config["daemon"] = {"shutdown_grace_s": 0.0}
    handle: DaemonHandle = factory(config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    return handle


def ask_the_cloud(handle: DaemonHandle, ctx: Context, endpoint: SilentEndpoint) -> zmq.Socket[bytes]:
    """A turn accepted (its `decision` frame came) and sent to the endpoint, which holds it."""
    sock = dealer(handle, ctx)
    send(sock, "silent", "chat", prompt="Say hi.", options={"max_tokens": 5})
    assert receive(sock)["type"] == "decision"
    assert endpoint.asked.wait(60), "the endpoint was not asked"
    return sock


def test_a_stop_does_not_wait_for_a_cloud_endpoint_that_says_nothing(
    daemon_factory: Any, silent_endpoint: SilentEndpoint, ctx: Context
) -> None:
    """SIGTERM with a cloud turn waiting for its endpoint's first byte: the stop grace ran out and the turn
    was cancelled, but a cancel was seen only at the stream's next chunk, so the stop waited for the read's
    timeout (`cloud.timeout_s`, 30 s by default, and a retry each). systemd's TimeoutStopSec (40 s) then
    kills the daemon: the turn is recorded `interrupted` and its client never told. The turn now leaves the
    call when it is cancelled: recorded `cancelled`, its client told, the daemon gone."""
    handle = silent_cloud_daemon(daemon_factory, silent_endpoint)
    sock = ask_the_cloud(handle, ctx, silent_endpoint)
    handle.proc.send_signal(signal.SIGTERM)
    assert handle.proc.wait(120) == 0  # the endpoint would keep it 600 s
    frame = receive(sock)
    assert (frame["type"], frame["code"]) == ("error", "cancelled")
    assert [(r["outcome"], r["error"]) for r in handle.rows()] == [("cancelled", "the daemon is shutting down")]


def test_a_client_gone_while_the_cloud_says_nothing_ends_its_turn(
    daemon_factory: Any, silent_endpoint: SilentEndpoint, ctx: Context
) -> None:
    """A socket client that closed while its cloud turn waited for a silent endpoint: the turn sends no frame
    meanwhile, so nothing noticed, and the turn stayed in flight (its record `pending`, one of the client's
    and the door's turns taken) until the read timed out, then answered nobody from the local model. Now it
    is cancelled within a second and recorded so."""
    handle = silent_cloud_daemon(daemon_factory, silent_endpoint)
    ask_the_cloud(handle, ctx, silent_endpoint).close()
    wait_for(lambda: status(handle, ctx)["queue"]["in_flight"] == 0, 120, "the turn to end")
    assert [(r["outcome"], r["error"]) for r in handle.rows()] == [("cancelled", "the client disconnected")]


def silent_backend(endpoint: SilentEndpoint, tmp_path: Path, **cloud: Any) -> CloudBackend:
    loaded = load_config(write_config(tmp_path / "config.toml", cloud_config(endpoint.base_url, **cloud)), env={})
    return CloudBackend(loaded.cloud, loaded.source)


def test_a_cancelled_call_is_not_asked_again(silent_endpoint: SilentEndpoint, tmp_path: Path) -> None:
    """A call its cancelled turn left went on retrying after its read timed out (`cloud.max_retries`, 2 by
    default): it sent the question again for nobody, each time billable, and held its room among the calls
    left running for three timeouts rather than one. A cancelled call is not retried."""
    backend = silent_backend(silent_endpoint, tmp_path, timeout_s=1.0, max_retries=2)
    prompt = Prompt([{"role": "user", "content": "Say hi."}], 5, 0.0, None, lambda text: None)
    silent_endpoint.asked = prompt.cancelled  # the turn is cancelled once the endpoint has its question
    running = set(threading.enumerate())
    assert backend.generate("cloud-small", prompt).cancelled  # the turn leaves the call
    for call in set(threading.enumerate()) - running:
        call.join(120)  # the call left running ends by itself
        assert not call.is_alive()
    assert len(silent_endpoint.held) == 1  # asked once


def test_a_call_left_after_its_first_delta_keeps_when_that_came(
    silent_endpoint: SilentEndpoint, tmp_path: Path
) -> None:
    """A turn that left its call after text had streamed to its client was recorded with no first-token
    latency (`latency_first_token_ms` NULL, as if nothing had come), so /metrics' first-token histogram and
    `locod report` left it out; before the turn could leave its call, the cut stream kept it."""
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "cloud-small"}
    chunk["choices"] = [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]
    event = b"data: " + json.dumps(chunk).encode() + b"\n\n"
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    silent_endpoint.opening = head + b"%x\r\n%s\r\n" % (len(event), event)
    backend = silent_backend(silent_endpoint, tmp_path, timeout_s=600.0, deadline_s=1200.0, max_retries=0)
    cancelled = threading.Event()
    prompt = Prompt([{"role": "user", "content": "Say hi."}], 5, 0.0, None, lambda text: cancelled.set(), cancelled)
    generation = backend.generate("cloud-small", prompt)  # the client leaves once the first delta reached it
    assert (generation.cancelled, generation.text) == (True, "Hi")
    assert generation.first_token_ms is not None


def test_calls_left_running_are_bounded() -> None:
    """A call the turn leaves holds a thread and a connection until the endpoint ends it, and no longer
    counts among the turns the queue limits bound: a client asking and leaving in a loop would make the
    daemon hold any number. Past the room for calls left running, a cancelled turn waits for its call."""
    room = threading.Semaphore(1)
    release = [threading.Event(), threading.Event()]

    def silent(i: int) -> Any:
        def call(prompt: Prompt) -> Generation:
            release[i].wait(60)
            return Generation("late", 1, 1, None, 0.0)

        return call

    def left(streamed: Streamed) -> Generation:
        return Generation("", 0, 0, None, 0.0, cancelled=True)

    cancelled = threading.Event()
    cancelled.set()
    prompt = Prompt([], 5, 0.0, None, lambda text: None, cancelled)
    assert run_leaving_on_cancel(silent(0), prompt, left, room).cancelled  # left: the room is taken
    second: list[Generation] = []
    waiting = threading.Thread(target=lambda: second.append(run_leaving_on_cancel(silent(1), prompt, left, room)))
    waiting.start()
    waiting.join(2)
    assert waiting.is_alive() and not second  # no room: it waits for its call
    release[0].set()  # the first call ends: its room is free
    waiting.join(60)
    assert second and second[0].cancelled
    release[1].set()


def test_descriptors_return_to_their_count_after_a_burst_of_turns(daemon: DaemonHandle, ctx: Context) -> None:
    """Each turn thread made its own ZeroMQ socket to wake the serving loop, kept for the thread's life, and
    the pool keeps its threads: after a burst of N socket clients at once the daemon held N more descriptors
    for good (30 concurrent turns: 32 -> 61), up to daemon.queue_limit (256) of the open-file limit that
    the doors' shares are cut from. The threads now share one socket per wake-up, behind a lock."""
    pid = daemon.proc.pid
    warm = dealer(daemon, ctx)
    send(warm, "warm", "chat", prompt="Hi", options={"max_tokens": 1})
    while receive(warm)["type"] != "done":
        pass
    warm.close()
    wait_for(lambda: status(daemon, ctx)["queue"]["in_flight"] == 0, 60, "the first turn to end")
    before = len(os.listdir(f"/proc/{pid}/fd"))
    clients = [dealer(daemon, ctx) for _ in range(24)]
    for i, sock in enumerate(clients):
        send(sock, f"burst{i}", "chat", prompt="Hi", options={"max_tokens": 1})
    for sock in clients:
        while receive(sock)["type"] != "done":
            pass
        sock.close()
    wait_for(lambda: len(os.listdir(f"/proc/{pid}/fd")) <= before + 2, 60, "the descriptors to be given back")
