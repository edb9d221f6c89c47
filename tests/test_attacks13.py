"""Attack round 13: text the user did not write (a decision row a hostile process wrote, a prior's
``source``, a cloud's answer and Location header) reaches their terminal and the daemon's log without an
escape sequence acting there, a line of its own, or a bidi override reordering what follows."""

from __future__ import annotations

import io
import json
import logging
import sqlite3
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from locod.daemon.logs import LineFormatter
from locod.policy.warmstart import PRIORS, USER_PRIORS, read_prior, save_prior

from .conftest import SECRET, cloud_config
from .test_policy import labelled_local_turn
from .test_terminal import on_a_terminal

# An OSC 52 clipboard write, a screen clear, an 8-bit CSI, a forged line and a Trojan Source override.
EVIL = "\x1b]52;c;cm0gLXJmIH4K\x07\x1b[2J\x9b31m\r\nFORGED\u202eevil\u2066"
ACTING = ("\x1b", "\x07", "\x9b", "\u202e", "\u2066", "\r")


def acts_on_a_terminal(text: str) -> list[str]:
    return [c for c in ACTING if c in text]


def test_decisions_id_escapes_every_column_a_hostile_process_wrote(daemon_factory: Any) -> None:
    """`locod decisions ID` read the model of each weighed option, where it ran, the outcome, the confidence
    and shadow models and the label's source unescaped: a process that can write locod.db (or a config's
    model name) wrote escape sequences to the terminal of whoever asked why a turn went where it did."""
    handle = daemon_factory()
    handle.client().ask("Say hi.", max_tokens=2)
    handle.stop()
    (decision,) = (row["id"] for row in handle.rows())
    judged = {"model": EVIL, "s_answered": 0.9, "s_prompt": 0.5, "kept": True}
    shadow = {"model": EVIL, "satisfied": True, "grader": EVIL}
    conn = sqlite3.connect(handle.db_path)
    with conn:
        conn.execute(
            "UPDATE decisions SET model = ?, backend = ?, outcome = ?, error = ?, s_hat = ?, costs = ?, mask = ?, "
            "confidence = ?, shadow = ?, satisfied = 1, label_source = ? WHERE id = ?",
            (
                EVIL,
                EVIL,
                EVIL,
                EVIL,
                json.dumps({EVIL: 0.5}),
                json.dumps({EVIL: 1.0}),
                json.dumps({EVIL: True, "x" + EVIL: False}),
                json.dumps(judged),
                json.dumps(shadow),
                EVIL,
                decision,
            ),
        )
    conn.close()
    shown = handle.cli("decisions", str(decision))
    assert shown.returncode == 0, shown.stderr
    assert acts_on_a_terminal(shown.stdout) == []
    assert "FORGED" in shown.stdout and not any(line.startswith("FORGED") for line in shown.stdout.splitlines())
    assert "\\u202eevil" in shown.stdout  # named, not acted on


def test_a_row_that_is_not_utf8_is_listed_and_labelled(daemon_factory: Any) -> None:
    """A TEXT value that is not UTF-8 (another program's write, a damaged page) failed every read it was in:
    `locod decisions` and `locod feedback` said only "Could not decode to UTF-8", quoting the raw bytes (an
    escape sequence among them) into the error, until the row was found and deleted by hand."""
    handle = daemon_factory()
    handle.client().ask("Say hi.", max_tokens=2, session="s")
    conn = sqlite3.connect(handle.db_path)
    with conn:
        conn.execute("UPDATE decisions SET session = CAST(x'1b5b324aff41' AS TEXT), prompt = CAST(x'ff' AS TEXT)")
    conn.close()
    (decision,) = (row["id"] for row in handle.rows("SELECT id FROM decisions"))
    for args in (("decisions",), ("decisions", str(decision))):
        listed = handle.cli(*args)
        assert listed.returncode == 0, listed.stderr
        assert "\\x1b[2J\\xffA" in listed.stdout and acts_on_a_terminal(listed.stdout) == []
    labelled = handle.cli("feedback", str(decision), "good")
    assert labelled.returncode == 0, labelled.stderr
    handle.stop()
    stopped = handle.cli("decisions")  # read from the file
    assert stopped.returncode == 0 and "\\x1b[2J\\xffA" in stopped.stdout, stopped.stderr


def test_a_row_of_other_types_is_listed_and_explained(daemon_factory: Any) -> None:
    """A row another program wrote with text in number columns and a JSON column that is not JSON made the
    daemon's `decisions` op fail unanswered (the client waited 10 s and called the daemon stuck) and the
    stopped-daemon read a traceback; each column is shown as stored, the others' rows as ever."""
    handle = daemon_factory()
    handle.client().ask("Say hi.", max_tokens=2)
    handle.client().ask("Say hello.", max_tokens=2)
    first, second = (row["id"] for row in handle.rows("SELECT id FROM decisions ORDER BY id"))
    conn = sqlite3.connect(handle.db_path)
    with conn:
        conn.execute(
            "UPDATE decisions SET created = 'yesterday', cost_usd = 'lots', latency_total_ms = 'slow', "
            "tokens_out = 'many', telemetry = '{not json', s_hat = '[1, 2]', sla = 'high' WHERE id = ?",
            (first,),
        )
    conn.close()
    for args in (("decisions",), ("decisions", str(first)), ("decisions", "--json")):
        listed = handle.cli(*args)
        assert listed.returncode == 0, listed.stderr
        assert "lots" in listed.stdout
    assert "{not json" in handle.cli("decisions", "--json").stdout
    assert "not as locod writes one" in handle.cli("decisions", str(first)).stdout
    assert "cost 1.00 <- chosen" in handle.cli("decisions", str(second)).stdout  # the other rows as ever
    handle.stop()
    stopped = handle.cli("decisions")  # read from the file
    assert stopped.returncode == 0 and "slow" in stopped.stdout, stopped.stderr


def test_a_priors_source_reaches_status_and_the_log_escaped(daemon_factory: Any, tmp_path: Path) -> None:
    """A user prior (<state dir>/priors, written by scripts/fit_prior.py or copied from someone else) says
    what it was fitted on in its ``source``: `locod status` printed it raw, and the log escaped C0 controls
    but not an 8-bit CSI (U+009B) or a bidi override."""
    shipped = read_prior(next(PRIORS.glob("*.npz")))
    save_prior(
        type(shipped)(shipped.sha256, shipped.gguf_size, shipped.weights, shipped.confidence, EVIL),
        tmp_path / "d" / "state" / USER_PRIORS,
    )
    handle = daemon_factory()
    status = handle.cli("status")
    assert status.returncode == 0, status.stderr
    assert "fitted on \\x1b]52" in status.stdout  # it was this prior the predictor started from
    assert acts_on_a_terminal(status.stdout) == []
    assert not any(line.startswith("FORGED") for line in status.stdout.splitlines())
    logged = handle.log()
    assert "starts from the prior fitted on \\x1b]52" in logged
    assert acts_on_a_terminal(logged) == []


class _Hostile(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint: under /redirect a 307 whose Location carries an 8-bit CSI and a bidi
    override as raw bytes (obs-text, which HTTP allows); elsewhere an answer with a Trojan Source override."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path.startswith("/redirect"):
            location = b"location: http://evil\xc2\x9b2J\xe2\x80\xaeexample/v1\r\n"
            self.wfile.write(b"HTTP/1.1 307 Temporary Redirect\r\n" + location + b"content-length: 0\r\n\r\n")
            return
        chunk = {"choices": [{"index": 0, "delta": {"content": "if ok:\u202e } \u2066 return"}}]}
        done = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 3}}
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in (chunk, done)) + "data: [DONE]\n\n"
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("content-length", str(len(body.encode())))
        self.end_headers()
        self.wfile.write(body.encode())

    def do_GET(self) -> None:
        """A download refused with a reason phrase that clears the screen and writes the clipboard."""
        reason = EVIL.split("\r")[0].encode() + b" and on" * 5000  # http.client reads up to 64 kB of it
        self.wfile.write(b"HTTP/1.1 404 " + reason + b"\r\ncontent-length: 0\r\n\r\n")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def hostile_endpoint() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_bidi_override_in_an_answer_is_named_on_a_terminal_and_kept_in_a_pipe(
    daemon_factory: Any, hostile_endpoint: str
) -> None:
    """A Trojan Source answer (code whose U+202E makes it read as other code) showed reordered on the
    terminal; on a terminal the override is now named, like an escape; into a pipe the text is as it came."""
    handle = daemon_factory(cloud_config(hostile_endpoint + "/v1"), extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    shown = on_a_terminal(handle, "ask", "hi").decode().replace("\r\n", "\n")  # the tty writes a newline so
    assert "if ok:\\u202e } \\u2066 return" in shown and acts_on_a_terminal(shown) == []
    piped = handle.cli("ask", "hi")
    assert piped.returncode == 0 and "if ok:\u202e } \u2066 return" in piped.stdout


def test_a_redirects_location_reaches_stderr_and_the_log_as_ascii(daemon_factory: Any, hostile_endpoint: str) -> None:
    """A cloud's 3xx is named with the host its Location points to: its obs-text bytes came through as an
    8-bit CSI and a bidi override, into `locod ask`'s error (also into a file, where no terminal check runs),
    the decision record and the log."""
    config = cloud_config(hostile_endpoint + "/redirect/v1")
    handle = daemon_factory(config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    asked = handle.cli("ask", "hi")
    assert "a redirect to evil" in asked.stderr, asked.stderr
    assert acts_on_a_terminal(asked.stderr) == []
    assert "evil\\x9b2J\\u202eexample" in asked.stderr
    (row,) = handle.rows()
    assert acts_on_a_terminal(row["error"]) == [] and acts_on_a_terminal(handle.log()) == []


def test_an_error_quoting_a_server_is_escaped_into_a_file_too(daemon_factory: Any, hostile_endpoint: str) -> None:
    """`locod models pull` names a refusal with the server's reason phrase, which the server writes: its
    escapes went raw to stderr whenever stderr was not a terminal (`2>>pull.log`, a cron job's mail, a
    systemd unit's journal), where `cat` or a pager acted on them later. What locod says is escaped
    wherever it goes; only an answer on stdout keeps its bytes (it is the user's data)."""
    handle = daemon_factory()
    pulled = handle.cli("models", "pull", hostile_endpoint + "/x.gguf")
    assert pulled.returncode != 0 and "the server answered 404 \\x1b]52" in pulled.stderr, pulled.stderr
    assert acts_on_a_terminal(pulled.stderr) == []
    assert max(len(line) for line in pulled.stderr.splitlines()) < 300  # not 35 kB of the server's words


def test_a_traceback_in_the_log_escapes_what_its_exception_quotes() -> None:
    """An unexpected failure is logged with its traceback, whose last line is the exception's message: one
    that quoted a client's text put its escapes on the terminal of whoever ran `locod serve` (or `tail`ed
    its log). Each traceback line is escaped now, as messages were; the traceback keeps its lines."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LineFormatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("locod.test_attacks13")
    logger.addHandler(handler)
    try:
        raise ValueError(f"session {EVIL}")
    except ValueError:
        logger.exception("request from a client failed")
    finally:
        logger.removeHandler(handler)
    logged = stream.getvalue()
    assert "Traceback (most recent call last):\n" in logged and "ValueError: session \\x1b]52" in logged
    assert acts_on_a_terminal(logged) == []


def test_training_leaves_out_a_labelled_row_of_other_types(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`locod policy train --from-db` read every labelled turn with json.loads and the numbers as stored: one
    row another program wrote (a JSON column that is not JSON, text in a number column) failed the whole
    training with a traceback. Such rows are left out, said in one line; the others are trained on."""
    from locod.daemon.records import DecisionLog, labelled_turns

    log = DecisionLog(tmp_path / "locod.db")
    for turn in range(3):
        labelled_local_turn(log, turn=turn, request_id=f"r{turn}")
    log.close()
    conn = sqlite3.connect(tmp_path / "locod.db")
    with conn:
        conn.execute("UPDATE decisions SET telemetry = '{not json' WHERE turn = 0")
        conn.execute("UPDATE decisions SET latency_total_ms = 'slow' WHERE turn = 1")
    conn.close()
    with caplog.at_level(logging.WARNING, logger="locod.daemon.records"):
        (trained,) = labelled_turns(tmp_path / "locod.db")
    assert trained.turn == 2
    assert "2 labelled turns of" in caplog.text and "left out" in caplog.text
