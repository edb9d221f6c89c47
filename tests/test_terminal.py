"""Escape sequences from clients (session ids) and from models (answers) never reach the user's terminal
as such: `locod decisions` and `locod ask` show them escaped, and keep an answer's newlines and tabs."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from locod.terminal import shown

from .conftest import SECRET, DaemonHandle, cloud_config, locod_command

HOSTILE = "safe \x1b]0;PWNED\x07\x1b[2J\x1b[31mred\x9b\nline\tend"


def test_control_characters_are_escaped_and_layout_kept() -> None:
    assert shown(HOSTILE) == "safe \\x1b]0;PWNED\\x07\\x1b[2J\\x1b[31mred\\x9b\nline\tend"
    assert shown("a\nb\tc\rd", layout=False) == "a\\nb\\tc\\rd"
    assert shown("plain, ünïcödé ⁂") == "plain, ünïcödé ⁂"


class _Hostile(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint whose answer carries escape sequences."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        chunks = [
            {"choices": [{"index": 0, "delta": {"content": HOSTILE}, "finish_reason": None}]},
            {
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
            },
        ]
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("content-length", str(len(body.encode())))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def hostile_cloud() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def on_a_terminal(handle: DaemonHandle, *args: str) -> bytes:
    """What `locod ARGS` writes to stdout when stdout is a terminal (a real pseudo-terminal)."""
    master, slave = pty.openpty()
    command = locod_command("--config", str(handle.config_path), *args)
    proc = subprocess.Popen(command, stdout=slave, stderr=subprocess.PIPE, env=handle.env)
    os.close(slave)
    out = b""
    while True:
        try:
            piece = os.read(master, 4096)
        except OSError:  # EIO: the other end closed
            break
        if not piece:
            break
        out += piece
    os.close(master)
    assert proc.wait(120) == 0, proc.stderr.read() if proc.stderr else None
    return out


def test_answers_and_session_ids_reach_the_terminal_escaped(daemon_factory: Any, hostile_cloud: str) -> None:
    handle = daemon_factory(cloud_config(hostile_cloud, mode="auto"), extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    shown_answer = on_a_terminal(handle, "ask", "hi", "--model", "cloud-small")
    assert b"\x1b" not in shown_answer and b"\x07" not in shown_answer
    assert b"safe \\x1b]0;PWNED\\x07\\x1b[2J\\x1b[31mred\\x9b" in shown_answer
    assert b"line\tend" in shown_answer  # the answer's layout is kept
    piped = handle.cli("ask", "hi", "--model", "cloud-small")  # into a pipe or a file: the text as it is
    assert piped.returncode == 0 and HOSTILE in piped.stdout

    session = "\x1b]0;PWNED-TITLE\x07\x1b[31mRED\nX"
    handle.client().ask("Say hi.", session=session, model="smollm2-135m-instruct", max_tokens=2)
    listed = handle.cli("decisions")
    assert listed.returncode == 0 and "\x1b" not in listed.stdout and "\x07" not in listed.stdout
    assert "\\x1b]0;PWNED-TITLE\\x07\\x1b[31mRED\\nX" in listed.stdout
    assert len(listed.stdout.splitlines()) == 4  # the header and three rows: the newline did not add one
