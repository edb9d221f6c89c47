"""One rule for both doors: the HTTP API takes the option values the socket takes and refuses the same
ones in the same words, and a ZeroMQ REQ socket is told what to use instead of waiting forever."""

from __future__ import annotations

import json
from typing import Any

import pytest
import zmq

from locod.daemon.openai_wire import HttpError, parse_completion
from locod.protocol import BadRequest, ChatOptions, ChatRequest, encode_request, parse_request

from .conftest import DaemonHandle

LOCAL = "smollm2-135m-instruct"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("seed", 2**70),
        ("seed", -(2**200)),
        ("seed", True),
        ("seed", 1.5),
        ("max_tokens", True),
        ("max_tokens", 0),
        ("temperature", 2.5),
        ("temperature", True),
        ("temperature", "1"),
    ],
)
def test_both_doors_refuse_the_same_option_values(name: str, value: Any) -> None:
    """F21: one rule for both doors, and the same words for it."""
    with pytest.raises(HttpError) as http_error:
        parse_completion({"model": "auto", "messages": [{"role": "user", "content": "hi"}], name: value}, [LOCAL])
    raw = json.dumps({"v": 1, "id": "r", "op": "chat", "prompt": "hi", "options": {name: value}}).encode()
    with pytest.raises(BadRequest) as socket_error:
        parse_request([raw], 1 << 20)
    assert http_error.value.status == 400 and socket_error.value.code == "bad_field"
    why = socket_error.value.message.split(f"'options.{name}' ", 1)[1]
    assert http_error.value.message == f"{name!r} {why}"


def test_n_is_an_integer_one_and_may_be_null() -> None:
    ask = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
    assert parse_completion({**ask, "n": None}, [LOCAL]).options.stream is False
    assert parse_completion({**ask, "n": 1}, [LOCAL])
    for n in (True, 1.0, 2):
        with pytest.raises(HttpError, match="'n' must be 1"):
            parse_completion({**ask, "n": n}, [LOCAL])
    with pytest.raises(HttpError, match="'stream' must be true or false"):
        parse_completion({**ask, "stream": 0}, [LOCAL])


def test_a_logit_bias_is_refused_unless_empty() -> None:
    """A bias changes which tokens an answer may have; neither model is given it, so it is refused, not
    silently dropped (an empty one, as clients send by default, asks for nothing)."""
    ask = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
    assert parse_completion({**ask, "logit_bias": {}}, [LOCAL])
    with pytest.raises(HttpError, match="'logit_bias' is not supported by locod"):
        parse_completion({**ask, "logit_bias": {"50256": -100}}, [LOCAL])


def test_values_in_range_pass_both_doors_alike() -> None:
    options = {"seed": 2**63 - 1, "temperature": 2, "max_tokens": 5}
    http_options = parse_completion(
        {"model": "auto", "messages": [{"role": "user", "content": "hi"}], **options}, [LOCAL]
    ).options
    request = ChatRequest("r", [{"role": "user", "content": "hi"}], options=ChatOptions(**options))
    socket_options = parse_request([encode_request(request)], 1 << 20).options  # type: ignore[union-attr]
    assert (http_options.seed, http_options.temperature, http_options.max_tokens) == (2**63 - 1, 2.0, 5)
    assert (socket_options.seed, socket_options.temperature, socket_options.max_tokens) == (2**63 - 1, 2.0, 5)


def test_a_zeromq_req_socket_is_told_to_use_a_dealer(daemon: DaemonHandle) -> None:
    """A REQ socket (the usual first try) frames its message behind an empty frame and reads only replies
    framed so: it gets one, saying what to use, instead of waiting forever."""
    ctx = zmq.Context()
    try:
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(daemon.endpoint)
        req.send(json.dumps({"v": 1, "id": "r", "op": "ping"}).encode())
        assert req.poll(30_000), "the REQ socket got no reply"
        reply = json.loads(req.recv())
        assert reply["type"] == "error" and "DEALER" in reply["message"]
        req.close()
    finally:
        ctx.term()
    assert daemon.client().ping()["pong"]
