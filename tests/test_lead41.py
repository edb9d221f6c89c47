"""A request lost with the connection it went out on: the daemon's guard at its bound on ipc connections takes
a connection and shuts it at once, and a client that came just as others closed (the guard still counting
them) lost its request, then waited out its timeout on the next connection to be told the daemon might be
stuck (test_attack37 met it about one run in ten). A fake daemon end (a real ZeroMQ ROUTER) reads the request,
then closes and binds again at the same path, as the guard's shut looks from the client."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from locod.client import Client
from locod.daemon.config import load_config
from locod.errors import DaemonNotRunning


class DroppingEnd:
    """Reads the first ``drop_after`` requests, leaves them unanswered and drops their connection; answers every
    request after that with a result."""

    def __init__(self, path: Path, drop_after: int = 1) -> None:
        self.address = f"ipc://{path}"
        self.drop_after = drop_after
        self.received: list[dict[str, object]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _router(self) -> zmq.Socket[bytes]:
        router: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(self.address)
        return router

    def _serve(self) -> None:
        router = self._router()
        while not self._done.is_set():
            if not router.poll(100):
                continue
            peer, raw = router.recv_multipart()
            request = json.loads(raw)
            self.received.append(request)
            if len(self.received) <= self.drop_after:
                if len(self.received) == self.drop_after:
                    router.close(linger=0)
                    router = self._router()
                continue
            reply = {"v": 1, "id": request["id"], "type": "result", "op": request["op"], "data": {"pong": True}}
            router.send_multipart([peer, json.dumps(reply).encode()])
        router.close(linger=0)

    def close(self) -> None:
        self._done.set()
        self._thread.join()


@pytest.fixture
def dropping_end(tmp_path: Path) -> Iterator[DroppingEnd]:
    (tmp_path / "run").mkdir()
    end = DroppingEnd(tmp_path / "run" / "locod.sock")
    yield end
    end.close()


def test_a_read_only_request_lost_with_its_connection_is_sent_again(dropping_end: DroppingEnd) -> None:
    with Client(dropping_end.address, timeout_s=20) as client:
        assert client.ping() == {"pong": True}
    first, again = dropping_end.received
    assert first == again and first["op"] == "ping"


def test_a_turn_lost_with_its_connection_is_never_sent_twice(dropping_end: DroppingEnd) -> None:
    """A turn the daemon may have read before the connection closed would run, and maybe bill, twice."""
    with Client(dropping_end.address, timeout_s=3, turn_timeout_s=3) as client, pytest.raises(DaemonNotRunning):
        client.ask("Say hi.", max_tokens=2)
    assert [request["op"] for request in dropping_end.received] == ["chat"]


def test_a_config_file_named_relative_is_the_daemons_source_as_an_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """review41: a daemon started with `--config rel.toml` kept the relative name as its source, so `locod
    reload` or `config show` from another folder, naming the same file, was told it named another file."""
    (tmp_path / "rel.toml").write_text("[routing]\nsla = 0.5\n")
    monkeypatch.chdir(tmp_path)
    config = load_config("rel.toml", env={})
    assert config.source == str(tmp_path / "rel.toml") and config.routing.sla == 0.5
