"""Cloud answers through any OpenAI-compatible endpoint, with retries, a circuit breaker and cost accounting.

Every call is bounded (``bounded_http``): a total deadline per turn, bytes per answer and per event, and
no more deltas than ``max_tokens`` whatever the server sends. Retries happen only before the first token
arrives (connection refused, timeout, 429 within ``max_retry_after_s``, 5xx): after that a retry could
repeat text, so a cut stream is a CloudError and the turn falls back to the local model. After
``breaker_failures`` failed turns in a row an endpoint's breaker opens and it is not tried for
``breaker_cooldown_s``: an offline laptop does not pay a timeout per turn. Each endpoint (base URL) has
its own breaker: one provider's outage never blocks another's models. A 4xx that the request caused
(400, 413, 422: an oversized or malformed request) is that request's failure, not the endpoint's, and
leaves the breaker alone: one client cannot switch the cloud off.

What the endpoint sends is not trusted: redirects are not followed (a 3xx would re-send the prompt to the
host its Location names), a ``Retry-After`` of any form is clamped to [0, ``max_retry_after_s``], a delta
whose content is not text (or holds a lone UTF-16 surrogate, which no encoder takes: kept in the session's
history, it failed each of its later turns) ends the stream as an invalid reply, its ``usage`` is checked
before it is priced (cloud_usage), and any other exception inside a call is a CloudError: the turn falls back.
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager
from typing import Any, cast
from urllib.parse import urlsplit

import httpx2
import openai

from locod import words
from locod.daemon.backends import Generation, Prompt, Upload
from locod.daemon.bounded_http import AFTER_CONNECTING, BoundedTransport, Limits, OverBound, ProxyRefused, limits
from locod.daemon.cloud_usage import counted
from locod.daemon.config import CloudConfig, CloudModelConfig, redacted_url
from locod.daemon.keyfile import key_source, read_api_key
from locod.daemon.proxy import first_hop, proxy_for
from locod.daemon.walkaway import LEFT_AT_MOST, Streamed, run_leaving_on_cancel
from locod.errors import CloudError
from locod.protocol import NOT_TEXT, SURROGATE, json_type

log = logging.getLogger(__name__)

# Transport failures before the request was written: nothing of it left the device.
NOT_CONNECTED = (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.PoolTimeout)
# 4xx statuses that speak of the endpoint, its key or its load rather than of one request.
ENDPOINT_4XX = frozenset({401, 403, 404, 408, 429})
# A passive upload-bandwidth sample needs a request this large (smaller ones measure latency), and each
# sample moves the estimate by this share.
BANDWIDTH_SAMPLE_BYTES, BANDWIDTH_WEIGHT = 50_000, 0.3
# How servers refuse a prompt past the model's context: OpenAI and vLLM ("maximum context length"),
# llama.cpp's servers ("exceed context window", "exceeds the available context size", "n_ctx"), Anthropic's
# compatible API ("prompt is too long"), Gemini's ("exceeds the maximum number of tokens allowed"), TGI ("must be
# <= 4096"); not every 400 that says "context".
CONTEXT_REFUSAL = re.compile(
    r"context[ _-]?(length|window|size)|\bn_ctx\b|prompt is too long|maximum number of tokens allowed"
    r"|tokens \+ `max_new_tokens` must be",
    re.IGNORECASE,
)
FINISH_WORD = re.compile(r"[a-z_]{1,40}")  # an endpoint's finish_reason passed on: stop, length, content_filter

# llama-cpp-python's server refuses a response format it does not take (``json_schema``) with a 500 carrying
# its request validation's error, which names the field's place after it: FastAPI's "1 validation error:\n
# {'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), ...", or pydantic's "1 validation error
# for CreateChatCompletionRequest\nresponse_format.type\n  Input should be ..."
VALIDATION_ERROR = re.compile(r"\bvalidation errors?\b")
FORMAT_FIELD = re.compile(r"'loc': \('body', 'response_format'|^response_format\b", re.MULTILINE)
# A call to a model that takes no key (``needs_key = false``) carries no Authorization header: the SDK sends its
# client's key, a placeholder it must be built with, on every call unless the call omits the header.
NO_KEY_SENT = {"Authorization": openai.Omit()}


def backoff_s(attempt: int) -> float:
    """The wait before retry ``attempt + 1``: 0.25 s, doubling, at most 2 s."""
    return min(2.0, 0.25 * 2**attempt)


def _ask(model: CloudModelConfig, client: openai.OpenAI, prompt: Prompt) -> openai.Stream:
    """One attempt: the streamed chat completion, with usage at its end (what the call is charged)."""
    return client.chat.completions.create(
        model=model.model,
        # Plain dicts in the shape the API documents; the client's TypedDicts vary by release.
        messages=cast(Any, prompt.messages),
        **_limits(model, prompt),
        stop=list(prompt.stop) if prompt.stop else openai.omit,
        response_format=cast(Any, prompt.response_format) or openai.omit,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=None if model.needs_key else NO_KEY_SENT,
    )


def _limits(model: CloudModelConfig, prompt: Prompt) -> dict[str, Any]:
    """The answer's length limit in the field the model takes, and the sampling settings where it takes them
    (those the request left unset, its seed, temperature, top_p and the penalties, stay the endpoint's own, as
    OpenAI's API leaves them: an endpoint that checks its fields strictly may refuse a null)."""
    limits: dict[str, Any] = {model.max_tokens_param: prompt.max_tokens}
    if model.sampling:
        limits.update(prompt.sampling.given())
        if prompt.seed is not None:
            limits["seed"] = prompt.seed
        if prompt.temperature is not None:
            limits["temperature"] = prompt.temperature
    return limits


def _client(model: CloudModelConfig, key: str | None, timeout_s: float, source: str) -> openai.OpenAI:
    """The model's client, bounded (``bounded_http``) and through its proxy. It retries nothing itself
    (``_open`` does, before the first token) and follows no redirect: the prompt would be re-sent to whatever
    host it names. A model without a key is built with a placeholder, which the SDK requires: sent to one that
    needs a key, its endpoint's 401 says to give it one; one that takes none is never sent it (``NO_KEY_SENT``)."""
    return openai.OpenAI(
        base_url=model.base_url,
        api_key=key or "no-key-configured",
        timeout=timeout_s,
        max_retries=0,
        http_client=openai.DefaultHttpx2Client(
            transport=BoundedTransport(proxy=proxy_for(model, source)), follow_redirects=False
        ),
    )


def _hint(model: CloudModelConfig, exc: openai.APIStatusError, source: str, prompt: Prompt) -> str:
    """What to do about a refusal of the key (401, 403), of the model id (404), of a request field a model
    does not take (400: OpenAI's reasoning models), or of the images or the response format it was sent,
    naming what was used.
    The endpoint's own message is read for those words only, never repeated: it may quote the request."""
    if exc.status_code in (401, 403) and not model.needs_key:
        return f": the endpoint asks for a key, but {model.name!r} has needs_key = false: remove it and give the key"
    if exc.status_code in (401, 403):
        return f": check the API key, which the daemon takes from {source}"
    if exc.status_code == 404:
        endpoint = redacted_url(model.base_url)
        hint = f": check model = {model.model!r}, the endpoint's model id, and base_url = {endpoint!r}"
        if urlsplit(model.base_url).path in ("", "/"):  # the server's address, not its API's: the usual slip
            hint += f" (OpenAI-compatible servers answer under a path: {endpoint.rstrip('/') + '/v1'!r}?)"
        return hint
    said = str(exc.message)
    if exc.status_code == 400 and "max_completion_tokens" in said and model.max_tokens_param == "max_tokens":
        return f': it takes max_completion_tokens: set max_tokens_param = "max_completion_tokens" for {model.name!r}'
    if exc.status_code == 400 and "temperature" in said and model.sampling:
        return f": the model takes only its own temperature: set sampling = false for {model.name!r}"
    if _format_refused(exc, prompt):
        return ": the endpoint may not take this response_format (JSON mode or a schema), which a local model follows"
    if exc.status_code == 400 and CONTEXT_REFUSAL.search(said):
        longer = ": the prompt may be longer than its context"
        if not model.context_tokens:
            return f"{longer}: set context_tokens for {model.name!r}, so such prompts go to a model that holds them"
        return f"{longer}: is context_tokens = {model.context_tokens} for {model.name!r} more than it holds?"
    return _vision_hint(model, prompt.upload.images) if exc.status_code in (400, 422, 500) else ""


def _format_refused(exc: openai.APIStatusError, prompt: Prompt) -> bool:
    """Whether the endpoint refused the response format the request asked for: asking again will not help,
    and the endpoint is no less well for it, so it does not count towards opening its breaker, which would
    mask it for every other turn. A 400 or 422 naming the field is a refusal; a 500 only when it is
    llama-cpp-python's (its request validation naming the field), since another endpoint's failing 500 may
    echo the request body, field and all, and must still open the breaker."""
    if prompt.response_format is None:
        return False
    said = str(exc.message)
    if exc.status_code in (400, 422):
        return "response_format" in said
    return exc.status_code == 500 and _names_format_after_validation_error(said)


def _names_format_after_validation_error(said: str) -> bool:
    """Whether the field's place follows the words "validation error", looked for after their first use
    only: one expression holding both was tried anew from each use, to the message's end, and a 500 of 1 MB
    repeating the words (within cloud.max_answer_bytes) held the whole daemon half an hour (docs/reliability.md)."""
    first = VALIDATION_ERROR.search(said)
    return first is not None and FORMAT_FIELD.search(said, first.end()) is not None


def _vision_hint(model: CloudModelConfig, images: int) -> str:
    """A model that cannot see images fails a request with one in the endpoint's own way (a 400 or 422, a 500,
    a stream without text: llama.cpp's server with a text-only GGUF), rarely in words that name images; the
    model's entry says it can (``vision``, true by default), so the user is told which setting to check."""
    return f" (if it cannot see images, set vision = false for {model.name!r})" if images else ""


class CircuitBreaker:
    """One endpoint's breaker: open after ``failures`` failed calls in a row, for ``cooldown_s``, so an endpoint
    that is down costs no timeout per turn."""

    def __init__(self, failures: int, cooldown_s: float, endpoint: str = "") -> None:
        """``endpoint``: the base URL it guards, as the log names it (credentials left out)."""
        self.limit, self.cooldown_s, self.endpoint = failures, cooldown_s, endpoint
        self.consecutive = 0
        self.opened_at: float | None = None
        self.unconnected = False  # its last failure found no connection: the network may be at fault, not it
        self._lock = threading.Lock()

    @property
    def blocking(self) -> bool:
        """Open and still cooling down. Once the cooldown has passed the cloud may be chosen again
        (half-open): the next cloud call's success closes the breaker, its failure reopens it. Reading this
        changes nothing, so a turn routed locally does not use up the trial."""
        opened_at = self.opened_at
        return opened_at is not None and time.monotonic() - opened_at < self.cooldown_s

    def success(self) -> None:
        with self._lock:
            self.consecutive, self.opened_at = 0, None

    def failure(self, connected: bool = True) -> None:
        """A failed call; ``connected`` False when it found no connection (refused, unresolved, no route)."""
        with self._lock:
            self.unconnected = not connected
            self.consecutive += 1
            if self.consecutive >= self.limit:
                if self.opened_at is None:
                    log.warning(
                        "cloud circuit breaker of %s open after %d failures; retrying in %.0f s",
                        self.endpoint,
                        self.consecutive,
                        self.cooldown_s,
                    )
                self.opened_at = time.monotonic()

    def allow_trial(self) -> None:
        """End an open breaker's cooldown now: the next call is tried, and its failure alone opens the
        breaker again. A reload does this, since it is how a rotated key or a fixed base_url arrives: the
        user's next turn must not wait out a cooldown that the old settings earned."""
        with self._lock:
            if self.opened_at is not None:
                self.consecutive, self.opened_at = self.limit - 1, None

    def network_back(self, since: float) -> bool:
        """End the cooldown of a breaker that opened for want of a connection before ``since``, when a probe
        begun then connected to its endpoint's first hop: the network is back (Wi-Fi joined again, an outage
        over), and the user's next turn may try the cloud instead of waiting out the cooldown. One opened by
        the endpoint's answers (5xx, a refused key, a cut stream) keeps it: a connection says nothing of those.
        True if it ended one."""
        with self._lock:
            if self.opened_at is None or not self.unconnected or self.opened_at >= since:
                return False
            self.consecutive, self.opened_at = self.limit - 1, None
            return True

    @property
    def state(self) -> str:
        return "closed" if self.opened_at is None else "open"


class CloudBackend:
    """The cloud models, each with its client and its endpoint's breaker, behind the calls every backend
    answers (``backends.Backend``)."""

    def __init__(self, config: CloudConfig, source: str) -> None:
        self.breakers: dict[str, CircuitBreaker] = {}  # by base URL
        self.upload_bps: float | None = None  # EWMA of measured upload speed, for telemetry
        # For telemetry, which probes again when a call says other than its probe did (racy counts will do):
        self.answered = 0  # calls answered: the network works
        self.unreachable = 0  # calls that found no connection: it may not
        self._may_leave = threading.BoundedSemaphore(LEFT_AT_MOST)  # cancelled turns' calls still running
        self.keyless: dict[str, str] = {}  # models without a key -> the variable it is read from, for status
        self.reconfigure(config, source)

    def reconfigure(self, config: CloudConfig, source: str) -> None:
        """Take a (new) [cloud] section, at start and on reload. Every model's key is read before anything
        changes, so a bad key file raises ConfigError and leaves the running models as they were; a turn
        already talking to the cloud keeps the client it started with. A model without a key is said once
        in the log (never a key itself) and in ``keyless`` for `locod status`: most endpoints refuse it."""
        keys = {model.name: read_api_key(model, source) for model in config.models}
        models = {
            model.name: (model, _client(model, keys[model.name], config.timeout_s, source)) for model in config.models
        }
        self._retune_breakers(config)  # before the models: a model is never seen without its breaker
        self._models = models  # one assignment: a turn looks a model and its client up together
        self._key_sources = {model.name: key_source(model) for model in config.models}
        # as key_source reads it: a model that takes no key reads no variable
        self.key_from_env = [m.name for m in config.models if m.needs_key and os.environ.get(m.api_key_env)]
        self.config, self._source = config, source
        self._note_keyless(config, keys)

    def _retune_breakers(self, config: CloudConfig) -> None:
        """A breaker for each new endpoint, and every breaker given the section's limits and a trial: a reload
        is how a key or endpoint is fixed, so the next turn tries it."""
        added = {
            model.base_url: CircuitBreaker(
                config.breaker_failures, config.breaker_cooldown_s, redacted_url(model.base_url)
            )
            for model in config.models
            if model.base_url not in self.breakers
        }
        # One assignment, never a change in place: status and /metrics go through them while a reload runs.
        self.breakers = {**self.breakers, **added}
        for breaker in self.breakers.values():
            breaker.limit, breaker.cooldown_s = config.breaker_failures, config.breaker_cooldown_s
            breaker.allow_trial()

    def _note_keyless(self, config: CloudConfig, keys: dict[str, str | None]) -> None:
        """Keep the models without a key for `locod status`, and say each in the log once (a reload repeats no
        warning). A model that takes no key (``needs_key = false``) is neither."""
        said = self.keyless
        self.keyless = {m.name: m.api_key_env for m in config.models if m.needs_key and not keys[m.name]}
        for model in config.models:
            if model.name in self.keyless and model.name not in said:
                log.warning(
                    "cloud model %r has no API key: set $%s, or api_key_file in its [[cloud.models]] entry",
                    model.name,
                    model.api_key_env,
                )

    def reached(self, hop: tuple[str, int], since: float) -> None:
        """The network probe, begun at ``since``, connected to ``hop``: the breakers of the endpoints reached
        through it that opened for want of a connection let the next call try (``CircuitBreaker.network_back``)."""
        for model, _ in self._models.values():
            breaker = self.breakers[model.base_url]
            if first_hop(model, self._source) == hop and breaker.network_back(since):
                log.info("cloud endpoint %s is reachable again: its breaker lets the next call try", breaker.endpoint)

    def open_breakers(self) -> frozenset[str]:
        """The cloud models whose endpoint's breaker is open (cooling down)."""
        return frozenset(name for name, (model, _) in self._models.items() if self.breakers[model.base_url].blocking)

    def endpoint_breakers(self) -> dict[str, CircuitBreaker]:
        """The configured models' endpoints' breakers, by base URL. An endpoint a reload removed keeps its
        breaker in ``breakers`` (a turn already talking to it still counts its failures there), but it is
        none of the daemon's endpoints any more: status and /metrics show these only."""
        breakers = self.breakers  # the models' are in it before the models are (reconfigure)
        return {model.base_url: breakers[model.base_url] for model, _ in self._models.values()}

    @property
    def breaker_state(self) -> str:
        """``open`` while any configured endpoint's breaker is, else ``closed``."""
        return "open" if any(b.state == "open" for b in self.endpoint_breakers().values()) else "closed"

    def slot(
        self, client: Hashable, cancelled: threading.Event, on_wait: Callable[[int], None] | None = None
    ) -> AbstractContextManager[bool]:
        """Cloud turns run concurrently: no queue to wait in."""
        return contextlib.nullcontext(True)

    def fit(self, model: str, prompt: Prompt) -> Prompt:
        """The endpoint judges the prompt's length itself; its refusal is a CloudError like any other."""
        return prompt

    def generate(self, name: str, prompt: Prompt) -> Generation:
        """The answer, or what was streamed of it when the turn is cancelled: the turn leaves a call the
        endpoint keeps silent at once (``walkaway.py``)."""
        entry = self._models.get(name)
        if entry is None:  # a reload removed it after the turn was routed
            raise CloudError(f"no cloud model named {name!r} is configured any more", code="cloud_unknown_model")
        started = time.perf_counter()

        def left(streamed: Streamed) -> Generation:
            log.info("cloud %s: the turn was cancelled during the call, which is left to end by itself", name)
            parts = streamed.parts
            return _generation(entry[0], prompt, "".join(parts), None, len(parts), streamed.first, started)

        return run_leaving_on_cancel(lambda asked: self._generate(name, entry, asked), prompt, left, self._may_leave)

    def _generate(self, name: str, entry: tuple[CloudModelConfig, openai.OpenAI], prompt: Prompt) -> Generation:
        model, client = entry
        breaker = self.breakers[model.base_url]
        cfg = self.config
        started = time.perf_counter()
        bounds = Limits(time.monotonic() + cfg.deadline_s, cfg.max_answer_bytes, cfg.max_event_bytes)
        with limits(bounds):
            try:
                stream = self._open(name, model, client, breaker, prompt, bounds)
            except OverBound as exc:  # an error body over the bounds, or the deadline before any answer
                breaker.failure()
                raise CloudError(f"{name}: {exc}", code=exc.code) from None
            except CloudError:
                raise
            except Exception as exc:  # whatever else a reply made the client raise: a failed call, not a crash
                breaker.failure()
                log.warning("cloud %s: the call failed unexpectedly", name, exc_info=True)
                raise CloudError(
                    f"{name}: invalid reply from the endpoint: {type(exc).__name__}", code="cloud_invalid_reply"
                ) from None
            if _web_page(stream):  # the request was read, by a captive portal: what it uploaded left the device
                stream.close()
                breaker.failure()
                raise Received(f"{name}: {WEB_PAGE}", prompt.upload, "cloud_invalid_reply")
            return self._consume(name, model, breaker, stream, prompt, started)

    def _open(
        self,
        name: str,
        model: CloudModelConfig,
        client: openai.OpenAI,
        breaker: CircuitBreaker,
        prompt: Prompt,
        bounds: Limits,
    ) -> openai.Stream:
        """The answer's stream, retrying what may be retried (``_retry_delay``) within the deadline; a failure is
        a CloudError (``Received`` once the request may have been read), the endpoint's counted by its breaker."""
        attempt = 0
        sent = False  # an attempt got past connecting: the request, uploads included, may have been read

        def failed(message: str, code: str) -> CloudError:
            return Received(message, prompt.upload, code) if sent else CloudError(message, code=code)

        while True:
            try:
                stream = _ask(model, client, prompt)
            except openai.APIStatusError as exc:
                sent = True
                delay = self._status_retry(name, model, breaker, prompt, exc, attempt)
            except (openai.APIConnectionError, openai.APITimeoutError) as exc:
                if isinstance(exc.__cause__, OverBound):
                    raise exc.__cause__ from None
                sent = sent or not isinstance(exc.__cause__, NOT_CONNECTED)
                if attempt >= self.config.max_retries:
                    breaker.failure(connected=not _found_no_connection(exc.__cause__))
                    kind = "timed out" if isinstance(exc, openai.APITimeoutError) else "unreachable"
                    endpoint = redacted_url(model.base_url)
                    why = self._proxy_refusal(model, exc.__cause__) or _handshake(exc.__cause__)
                    message = f"{name}: endpoint {endpoint} {kind}{_unresolved(exc)}{why}"
                    self.unreachable += 1
                    raise failed(message, "cloud_unreachable") from None
                delay = backoff_s(attempt)
            except openai.OpenAIError as exc:
                breaker.failure()
                sent = True
                raise failed(
                    f"{name}: invalid reply from the endpoint: {type(exc).__name__}", "cloud_invalid_reply"
                ) from None
            else:
                return stream
            if delay >= bounds.left():
                breaker.failure()
                raise failed(f"{name}: no answer within the turn's deadline", "cloud_deadline")
            attempt += 1
            log.info("cloud %s: retry %d in %.2f s", name, attempt, delay)
            if prompt.cancelled.wait(delay):  # nobody waits for the answer: not asked (nor billed) again
                raise failed(f"{name}: the call was cancelled, so retry {attempt} is not made", "cancelled")

    def _status_retry(
        self,
        name: str,
        model: CloudModelConfig,
        breaker: CircuitBreaker,
        prompt: Prompt,
        exc: openai.APIStatusError,
        attempt: int,
    ) -> float:
        """The delay before asking again after the endpoint answered ``exc``'s status; one not asked again
        raises ``Received`` (the endpoint read the request), counted by its breaker where it is the endpoint's
        fault."""
        if 300 <= exc.status_code < 400:
            breaker.failure()
            raise Received(f"{name}: {_redirect(exc)}", prompt.upload, "cloud_redirect") from None
        refused = _format_refused(exc, prompt)  # the request's fault: no retry, the endpoint is well
        delay = None if refused else self._retry_delay(exc, attempt)
        if delay is None:
            if not refused and (exc.status_code >= 500 or exc.status_code in ENDPOINT_4XX):
                breaker.failure()
            hint = _hint(model, exc, self._key_sources.get(name, ""), prompt)
            message = f"{name}: HTTP {exc.status_code} from the endpoint{hint}"
            raise Received(message, prompt.upload, "cloud_http", exc.status_code) from None
        return delay

    def _proxy_refusal(self, model: CloudModelConfig, exc: BaseException | None) -> str:
        """What a proxy that refused to connect to the endpoint answered, naming it (its credentials left out):
        it connected, and the endpoint was not reached."""
        if not isinstance(exc, ProxyRefused):
            return ""
        proxy = proxy_for(model, self._source)
        through = f"the proxy {redacted_url(proxy)}" if proxy else "its proxy"
        return f": {through} refused to connect to it (HTTP {exc.status}): does it let the endpoint's host through?"

    def _retry_delay(self, exc: openai.APIStatusError, attempt: int) -> float | None:
        """Seconds to wait before retrying an error status: a 5xx's backoff, or the wait a 429 asks for when it
        is within max_retry_after_s; None when it is not retried (any other status, or no retry left)."""
        if attempt >= self.config.max_retries or not (exc.status_code == 429 or exc.status_code >= 500):
            return None
        if exc.status_code == 429:
            headers = exc.response.headers
            wait = retry_after_s(headers.get("retry-after"), headers.get("date"))
            return wait if wait <= self.config.max_retry_after_s else None
        return backoff_s(attempt)

    def _consume(
        self,
        name: str,
        model: CloudModelConfig,
        breaker: CircuitBreaker,
        stream: openai.Stream,
        prompt: Prompt,
        started: float,
    ) -> Generation:
        """Pass the stream's text on as it comes, up to the turn's ``max_tokens`` deltas, and price what came;
        a stream that breaks off, or ends without an answer or without finishing it, fails the call."""
        first: float | None = None
        parts: list[str] = []
        usage = None
        finish: str | None = None  # the endpoint's finish_reason, once a chunk gives one that reads as a word
        finished = False  # once a chunk gives any, readable or not
        chunks = 0
        try:
            for chunk in stream:
                if prompt.cancelled.is_set():
                    break
                if chunk.usage is not None:
                    usage = chunk.usage
                if not chunk.choices:
                    continue
                if said := chunk.choices[0].finish_reason:
                    finished, finish = True, _finish_word(said)
                delta = _delta_text(chunk)
                if delta and chunks >= prompt.max_tokens:  # more than was asked for: the answer is complete
                    finished, finish = True, "length"
                    break
                if delta:
                    if first is None:
                        first = time.perf_counter()
                        self._measure_upload(prompt.upload.bytes, first - started)
                    chunks += 1
                    parts.append(delta)
                    prompt.on_delta(delta)
        except Exception as exc:  # the stream ended early: cut here, billed so far, answered locally
            # unless its finish chunk had come before the connection dropped: the answer is whole, and only the
            # stream's end was lost ([DONE], the usage chunk), so it stands, priced from its text if need be
            if not finished or not _broke_off(exc):
                breaker.failure()
                partial = _generation(model, prompt, "".join(parts), usage, chunks, first, started)
                why, code = _why_cut(exc, len(partial.text))
                raise StreamCut(f"{name}: {why}", partial, code=code) from None
        finally:
            stream.close()
        generation = _generation(model, prompt, "".join(parts), usage, chunks, first, started, finish)
        if not prompt.cancelled.is_set():
            self._check_complete(name, model, breaker, generation, finished)
        breaker.success()
        self.answered += 1
        return generation

    @staticmethod
    def _check_complete(
        name: str, model: CloudModelConfig, breaker: CircuitBreaker, generation: Generation, finished: bool
    ) -> None:
        """A stream that closed cleanly may still have said nothing, or never said its answer was complete."""
        if generation.first_token_ms is None:
            breaker.failure()
            upload = Upload(generation.images_sent, generation.bytes_up)
            hint = _vision_hint(model, generation.images_sent)
            raise Received(f"{name}: the endpoint returned no answer text{hint}", upload, code="cloud_invalid_reply")
        if not finished:
            breaker.failure()
            raise StreamCut(f"{name}: the answer stream ended without finishing", generation)

    def _measure_upload(self, sent: int, seconds: float) -> None:
        """Passive bandwidth estimate: request bytes over time to first token (an underestimate by design)."""
        if sent < BANDWIDTH_SAMPLE_BYTES or seconds <= 0:
            return
        rate = sent / seconds
        previous = rate if self.upload_bps is None else self.upload_bps
        self.upload_bps = previous + BANDWIDTH_WEIGHT * (rate - previous)

    def close(self) -> None:
        for _, client in self._models.values():
            client.close()


def _delta_text(chunk: Any) -> str | None:
    """A chunk's text, checked before any of it is passed on."""
    delta = chunk.choices[0].delta.content
    if delta is not None and not isinstance(delta, str):
        raise InvalidChunk(f"a delta's content is {json_type(type(delta))}, not text")
    if delta and SURROGATE.search(delta):  # JSON's "\ud800": kept, it fails the session's next turns
        raise InvalidChunk(f"a delta's content {NOT_TEXT}")
    return delta


MALFORMED = (ValueError, AttributeError, TypeError, LookupError)  # what reading a chunk of another shape raises


def _broke_off(exc: Exception) -> bool:
    """Whether a stream ended by its transport (the connection dropped, a timeout), not by what it said."""
    return not isinstance(exc, (OverBound, InvalidChunk, *MALFORMED))


def _why_cut(exc: Exception, received: int) -> tuple[str, str]:
    """Why a cloud answer stream ended early, and the code to report: past the turn's deadline or byte bounds,
    the endpoint breaking the protocol (a chunk's text; JSON, UTF-8 or the chunk's shape), or the transport
    (httpx/httpx2, API errors)."""
    if isinstance(exc, OverBound):
        return str(exc), exc.code
    if isinstance(exc, InvalidChunk):
        return f"invalid reply from the endpoint: {exc}", "cloud_invalid_reply"
    if isinstance(exc, MALFORMED):
        shape = "an event that is not a chat completion chunk"
        return f"invalid reply from the endpoint: {shape} ({type(exc).__name__})", "cloud_invalid_reply"
    silent = "went silent past cloud.timeout_s" if isinstance(exc, openai.APITimeoutError) else "broke off"
    return (
        f"the answer stream {silent} after {words.counted(received, 'character')} ({type(exc).__name__}): "
        "a slow or lossy network?",
        "cloud_stream_cut",
    )


def _found_no_connection(exc: BaseException | None) -> bool:
    """Whether a call failed for want of a connection (refused, unresolved, no route, none in time): one made
    whose TLS handshake then failed says the network is there, and the probe's connection vouches for nothing."""
    return isinstance(exc, NOT_CONNECTED) and not isinstance(exc, AFTER_CONNECTING)


def _handshake(exc: BaseException | None) -> str:
    """What a connection whose TLS handshake failed says: the network is there, something on it intercepts."""
    if not isinstance(exc, AFTER_CONNECTING):
        return ""
    return (
        ": it connected, but the TLS handshake failed (a captive portal to log in to, or a proxy or firewall "
        "that intercepts HTTPS?)"
    )


def _unresolved(exc: BaseException) -> str:
    """Why a failed connection failed, where a traveller can act on it: the endpoint's name did not resolve
    (offline, or a network whose DNS answers nothing yet). A bare "unreachable" said neither."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, socket.gaierror):
            return ": its host name does not resolve (is the device offline, or this network's DNS down?)"
        seen = seen.__cause__ or seen.__context__
    return ""


class InvalidChunk(Exception):
    """A streamed chunk that breaks the protocol (raised inside ``_consume``, never outside)."""


def retry_after_s(header: str | None, sent: str | None = None) -> float:
    """Seconds a ``Retry-After`` asks for: delta-seconds or an HTTP date; 1 s when absent or unreadable,
    and never negative or infinite (a wait of infinite seconds raises). A date is counted from the answer's
    own ``Date`` (``sent``), on the server's clock: counted from this machine's, a clock hours behind (a
    Jetson without an RTC before NTP sets it) read "in 2 s" as hours, not retried, and one ahead as none."""
    if header is None:
        return 1.0
    try:
        wait = float(header)
    except ValueError:
        when = _http_date(header)
        if when is None:
            return 1.0
        sent_at = _http_date(sent)
        wait = when - (time.time() if sent_at is None else sent_at)
    if math.isnan(wait):
        return 1.0
    return min(max(wait, 0.0), 1e9)  # inf -> 1e9 s: over any max_retry_after_s, so not retried


def _http_date(text: str | None) -> float | None:
    """The Unix time an HTTP date names, or None when absent, unreadable or without a zone."""
    if text is None:
        return None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return when.timestamp() if when.tzinfo is not None else None


WEB_PAGE = (
    "the endpoint answered with a web page, not an answer: is this network's sign-in page (a captive portal: "
    "cafe, hotel, train or plane Wi-Fi) in the way? Sign in with a browser; else check base_url"
)


def _web_page(stream: openai.Stream) -> bool:
    """A 200 whose body is HTML, not an event stream: what a captive portal answers every request with until
    the user signs in (the stream would read as no answer text at all)."""
    return stream.response.headers.get("content-type", "").lower().startswith("text/html")


def _redirect(exc: openai.APIStatusError) -> str:
    """A 3xx, named with the host it pointed to (the request was not re-sent there), without the user:password
    a Location may carry (an endpoint that builds it from the request's URL echoes the base_url's)."""
    location = exc.response.headers.get("location", "")
    try:
        host = urlsplit(redacted_url(location)).netloc or "the same host"
    except ValueError:
        host = "an unreadable Location"
    host = host[:200].encode("ascii", "backslashreplace").decode()  # obs-text bytes read as C1 controls (CSI)
    return (
        f"HTTP {exc.status_code} from the endpoint, a redirect to {host} that was not followed (a network's "
        "sign-in page, a captive portal, redirects every request: sign in with a browser; else set base_url "
        "to the endpoint itself)"
    )


class Received(CloudError):
    """The endpoint answered the request, with an error status or without text: the request and what it
    uploaded (``upload``) left the device, and the record says so, though nothing is billed. A failure with
    no answer at all (refused, unreachable, timed out) is a plain CloudError: nothing is known to have gone.
    ``status``: the HTTP status it answered, where that is the failure (``cloud_http`` names them all)."""

    def __init__(self, message: str, upload: Upload, code: str, status: int | None = None) -> None:
        super().__init__(message, code=code)
        self.upload = upload
        self.status = status


class StreamCut(Received):
    """The answer stream broke after it began: ``partial`` is what came, priced (an estimate unless the
    endpoint reported usage), since real providers bill a cut answer too."""

    def __init__(self, message: str, partial: Generation, code: str = "cloud_stream_cut") -> None:
        super().__init__(message, Upload(partial.images_sent, partial.bytes_up), code)
        self.partial = partial


def _finish_word(said: object) -> str | None:
    """An endpoint's finish_reason as the done frame and the HTTP door pass it on: a word (``content_filter``),
    else None (no reason of its own, as a local model's): 42, a list, or 100 kB of text reached the OpenAI
    client whole, where its SDK reads one of a few words."""
    return said if isinstance(said, str) and FINISH_WORD.fullmatch(said) else None


def _generation(
    model: CloudModelConfig,
    prompt: Prompt,
    text: str,
    usage: Any,
    chunks: int,
    first: float | None,
    started: float,
    finish: str | None = None,
) -> Generation:
    """What a stream produced, priced by the endpoint's usage when it is believable, else by an estimate;
    ``finish`` is the endpoint's own reason, None for a stream cut short."""
    tokens_in, tokens_out, estimated = counted(model.name, usage, prompt, text, chunks)
    return Generation(
        text=text,
        tokens_in=tokens_in,
        tokens_out=tokens_out,
        first_token_ms=None if first is None else (first - started) * 1000,
        total_ms=(time.perf_counter() - started) * 1000,
        cost_usd=model.price(tokens_in, tokens_out, prompt.upload.images),
        cost_estimated=estimated,
        images_sent=prompt.upload.images,
        bytes_up=prompt.upload.bytes,
        cancelled=prompt.cancelled.is_set(),
        finish_reason=finish,
    )
