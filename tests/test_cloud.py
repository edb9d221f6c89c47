"""Cloud offload against a real OpenAI-compatible server (llama_cpp.server on loopback) behind a
fault-injecting proxy that records what was uploaded."""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import os
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from locod.client import attachment
from locod.daemon.config import CloudModelConfig
from locod.daemon.proxy import proxy_for
from locod.errors import CloudError, ConfigError
from locod.policy import rule
from locod.protocol import Attachment

from .conftest import (
    SECRET,
    CloudServer,
    DaemonHandle,
    cloud_config,
    free_port,
    locod_command,
    start_daemon,
    wait_for,
    write_config,
)
from .faultproxy import Fault, FaultProxy, image_parts


def test_cloud_turn_streams_and_is_accounted(cloud_daemon: DaemonHandle, proxy: FaultProxy) -> None:
    result = cloud_daemon.client().ask("Name a planet.", max_tokens=16, temperature=0.0)
    assert result.decision.location == "cloud" and result.decision.reason == "routing.mode is cloud"
    assert any(f.type == "delta" for f in result.frames) and result.text
    (row,) = cloud_daemon.rows()
    assert row["outcome"] == "ok" and row["backend"] == "cloud" and row["model"] == "cloud-small"
    # usage as the endpoint reported it, priced per million tokens
    assert row["tokens_in"] > 0 and 0 < row["tokens_out"] <= 16
    assert row["cost_usd"] == pytest.approx((row["tokens_in"] * 1.0 + row["tokens_out"] * 2.0) / 1e6)
    (seen,) = proxy.chat_requests()
    assert seen.headers["authorization"] == f"Bearer {SECRET}"
    assert SECRET not in json.dumps(seen.body)
    assert seen.body["stream"] is True and seen.body["model"] == "cloud-small"
    status = cloud_daemon.client().status()
    assert status["cloud"]["spent_today_usd"] == pytest.approx(row["cost_usd"], abs=1e-6)


def test_session_moving_between_local_and_cloud_keeps_one_history(
    cloud_daemon: DaemonHandle, proxy: FaultProxy
) -> None:
    client = cloud_daemon.client()
    first = client.ask("My favourite fruit is mango.", session="mix", force="local", max_tokens=8)
    client.ask("What is my favourite fruit?", session="mix", force="cloud", max_tokens=8)
    (seen,) = proxy.chat_requests()
    assert seen.body["messages"] == [
        {"role": "user", "content": "My favourite fruit is mango."},
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "What is my favourite fruit?"},
    ]
    third = client.ask("And again?", session="mix", force="local", max_tokens=4)
    assert [r["location"] for r in cloud_daemon.rows()] == ["local", "cloud", "local"]
    assert third.done.tokens_in > first.done.tokens_in


def photo(width: int, height: int) -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
    pixels = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_LINEAR)
    ok, buf = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 92])
    assert ok
    return bytes(buf)


def test_images_are_downscaled_reencoded_and_private_ones_stay(
    cloud_daemon: DaemonHandle, proxy: FaultProxy, tmp_path: Path
) -> None:
    (tmp_path / "receipt.jpg").write_bytes(photo(4000, 3000))  # a 12-megapixel photo
    (tmp_path / "passport.jpg").write_bytes(photo(640, 480))
    files = [attachment(tmp_path / "receipt.jpg"), attachment(tmp_path / "passport.jpg", private=True)]
    result = cloud_daemon.client().ask("What is the total on this receipt photo?", attachments=files, max_tokens=8)
    assert result.decision.attachments_sent == ["receipt.jpg"]
    assert "private, kept on device: passport.jpg" in result.decision.reason
    (seen,) = proxy.chat_requests()
    urls = image_parts(seen)
    assert len(urls) == 1 and urls[0].startswith("data:image/jpeg;base64,")
    jpeg = base64.b64decode(urls[0].split(",", 1)[1])
    assert len(jpeg) <= 300_000
    decoded = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert max(decoded.shape[:2]) <= 1024 and decoded.shape[1] > decoded.shape[0]
    (row,) = cloud_daemon.rows()
    assert row["images_sent"] == 1 and json.loads(row["attachments_sent"]) == ["receipt.jpg"]
    assert row["cost_usd"] == pytest.approx((row["tokens_in"] + 2 * row["tokens_out"]) / 1e6 + 0.01)
    offered = json.loads(row["attachments_offered"])
    assert [a["name"] for a in offered] == ["receipt.jpg", "passport.jpg"] and offered[0]["width"] == 1024


def test_documents_send_only_the_relevant_chunks(cloud_daemon: DaemonHandle, proxy: FaultProxy) -> None:
    filler = "\n\n".join(f"Paragraph {i} talks about gardening, tomatoes and watering schedules." for i in range(60))
    doc = filler + "\n\nThe warranty for the dishwasher expires in March 2031 according to clause 14.\n\n" + filler
    files = [Attachment("document", "manual.md", data=doc.encode())]
    cloud_daemon.client().ask("When does the dishwasher warranty expire?", attachments=files, max_tokens=8)
    (seen,) = proxy.chat_requests()
    sent = seen.body["messages"][-1]["content"]
    assert "warranty for the dishwasher expires in March 2031" in sent
    assert len(sent) < len(doc) / 3  # excerpts, not the whole manual
    offered = json.loads(cloud_daemon.rows()[0]["attachments_offered"])
    assert offered[0]["relevance"] > 0.5


def test_a_prompt_about_the_whole_document_keeps_it_relevant(cloud_daemon: DaemonHandle, proxy: FaultProxy) -> None:
    # "summarise this" shares no term with the notes: it scored 0.0, under the rule's cut, so a routed cloud
    # answer (MESS+'s relevant uploads, the policy's slot) would have been made without them
    notes = "Meeting on Tuesday.\n\nBudget is 4000 euros for the trip to Lisbon.\n\nAlice brings the slides."
    files = [Attachment("document", "notes.md", data=notes.encode())]
    cloud_daemon.client().ask("Summarise this", attachments=files, max_tokens=8)
    (seen,) = proxy.chat_requests()
    assert "Alice brings the slides." in seen.body["messages"][-1]["content"]
    (offered,) = json.loads(cloud_daemon.rows()[0]["attachments_offered"])
    assert offered["relevance"] >= rule.MIN_RELEVANCE


def test_local_answer_to_an_image_turn_says_the_image_was_withheld(cloud_daemon: DaemonHandle, tmp_path: Path) -> None:
    (tmp_path / "cat.png").write_bytes(cv2.imencode(".png", np.zeros((64, 64, 3), np.uint8))[1].tobytes())
    result = cloud_daemon.client().ask(
        "What is in this picture?", attachments=[attachment(tmp_path / "cat.png")], force="local", max_tokens=4
    )
    assert "the local model cannot see images, withheld: cat.png" in result.decision.reason
    assert json.loads(cloud_daemon.rows()[0]["attachments_sent"]) == []


def _timing_out_after_5s(daemon_factory: Any, proxy: FaultProxy) -> DaemonHandle:
    """The cloud_daemon fixture's daemon with cloud_config's 5 s timeout, which the delay faults outlast."""
    return daemon_factory(cloud_config(proxy.base_url), extra_env={"LOCOD_CLOUD_API_KEY": SECRET})  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("fault", "cause"),
    [
        (Fault("status", status=500), "cloud_http"),
        (Fault("status", status=429, retry_after="3600"), "cloud_http"),
        (Fault("delay", delay_s=8.0, times=3), "cloud_unreachable"),
        (Fault("garbage"), "cloud_invalid_reply"),  # not JSON: not a chat completion
        (Fault("cut", cut_after_chunks=3), "cloud_stream_cut"),
    ],
)
def test_cloud_faults_end_in_a_local_answer(daemon_factory: Any, proxy: FaultProxy, fault: Fault, cause: str) -> None:
    cloud_daemon = _timing_out_after_5s(daemon_factory, proxy)
    proxy.set(fault)
    result = cloud_daemon.client().ask("Say something nice.", max_tokens=8)
    kinds = [f.type for f in result.frames]
    fallback = result.fallback
    assert fallback is not None and fallback.cause == cause and "answering locally" in fallback.message
    assert kinds[-1] == "done" and result.done.outcome == "fallback" and result.done.location == "local"
    assert "delta" in kinds[kinds.index("fallback") :]  # a real local answer follows
    (row,) = cloud_daemon.rows()
    assert row["outcome"] == "fallback" and row["backend"] == "local" and row["error"]
    assert row["error_code"] == cause  # the fallback frame's cause, to count failures by kind


def test_a_reasoning_model_gets_max_completion_tokens_and_no_sampling(daemon_factory: Any, proxy: FaultProxy) -> None:
    """OpenAI's reasoning models refuse max_tokens and any temperature but their own: the endpoint's 400
    says so, and the error tells which setting of the model to change; with it changed, the request carries
    the limit as max_completion_tokens and no temperature or seed."""
    config = cloud_config(proxy.base_url, max_retries=0)
    handle = daemon_factory(config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    refusal = (
        "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead."
    )
    proxy.set(Fault("status", status=400, message=refusal))
    result = handle.client().ask("Hi", max_tokens=8, force="cloud")
    assert result.fallback is not None
    assert "set max_tokens_param = \"max_completion_tokens\" for 'cloud-small'" in result.fallback.message
    assert "Unsupported parameter" not in result.fallback.message  # the endpoint's words are not repeated

    config["cloud"]["models"][0].update(max_tokens_param="max_completion_tokens", sampling=False)
    write_config(handle.config_path, config)
    assert handle.cli("reload").returncode == 0
    proxy.set(Fault("status", status=400, message="Unsupported value: 'temperature' does not support 0.7"))
    result = handle.client().ask("Hi", max_tokens=8, force="cloud")
    body = proxy.chat_requests()[-1].body
    assert body["max_completion_tokens"] == 8 and not {"max_tokens", "temperature", "seed"} & set(body), body
    assert result.fallback is not None and "sampling = false" not in result.fallback.message  # already false


@pytest.mark.parametrize(
    "fault",
    [
        Fault("status", status=500),  # the endpoint read the request, then failed
        Fault("garbage"),  # the stream broke before any text
        Fault("delay", delay_s=8.0, times=3),  # read, then no answer within timeout_s
    ],
)
def test_a_fallback_records_the_attachments_the_failed_cloud_attempt_sent(
    daemon_factory: Any, proxy: FaultProxy, tmp_path: Path, fault: Fault
) -> None:
    """Walk finding: an image turn whose cloud call failed was recorded with attachments_sent [] and
    images_sent 0, and the user told nothing, although the endpoint had received the image."""
    cloud_daemon = _timing_out_after_5s(daemon_factory, proxy)
    (tmp_path / "receipt.jpg").write_bytes(photo(640, 480))
    proxy.set(fault)
    result = cloud_daemon.client().ask("Total?", attachments=[attachment(tmp_path / "receipt.jpg")], max_tokens=4)
    assert result.done.outcome == "fallback" and result.fallback is not None
    assert image_parts(proxy.chat_requests()[0])  # the image did go out
    assert "cloud-small had received receipt.jpg" in result.fallback.message
    (row,) = cloud_daemon.rows()
    assert (json.loads(row["attachments_sent"]), row["images_sent"]) == (["receipt.jpg"], 1) and row["bytes_up"] > 0
    assert row["cost_usd"] == 0 or fault.kind == "garbage"  # a refused or unanswered request is not billed


def test_a_refused_connection_records_nothing_sent(daemon_factory: Any, tmp_path: Path) -> None:
    (tmp_path / "receipt.jpg").write_bytes(photo(640, 480))
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens here: the request is never written
    handle = daemon_factory(cloud_config(dead, max_retries=0), extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    result = handle.client().ask("Total?", attachments=[attachment(tmp_path / "receipt.jpg")], max_tokens=4)
    assert result.fallback is not None and "had received" not in result.fallback.message
    (row,) = handle.rows()
    assert (row["outcome"], json.loads(row["attachments_sent"]), row["images_sent"], row["bytes_up"]) == (
        "fallback",
        [],
        0,
        0,
    )


def test_retryable_faults_are_retried(cloud_daemon: DaemonHandle, proxy: FaultProxy) -> None:
    proxy.faults = [Fault("status", status=503, times=1), Fault("status", status=429, retry_after="0.2", times=1)]
    result = cloud_daemon.client().ask("Hello", max_tokens=4)
    assert result.done.outcome == "ok" and result.done.location == "cloud"
    assert len(proxy.chat_requests()) == 3


def test_connection_refused_falls_back_and_breaker_opens(daemon_factory: Any) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens here
    handle = daemon_factory(cloud_config(dead, max_retries=0))
    client = handle.client()
    for _ in range(3):
        assert client.ask("Hi", max_tokens=2).done.outcome == "fallback"
    assert client.status()["cloud"]["breaker"] == "open"
    result = client.ask("Hi", max_tokens=2)
    assert result.decision.location == "local"
    assert "circuit breaker of cloud-small's endpoint is open" in result.decision.reason
    assert [r["outcome"] for r in handle.rows()] == ["fallback", "fallback", "fallback", "ok"]


def test_breaker_recovers_after_cooldown(daemon_factory: Any, proxy: FaultProxy) -> None:
    """Open for the cooldown, then a trial turn closes it. The cooldown is long while the test checks that
    the breaker is open (on a busy machine a fallback answer took longer than a 5 s cooldown), then a reload
    ends it, as it ends any cooldown (a reload is how a fixed key or endpoint arrives); the cooldown running
    out by itself is test_rule's."""
    # timeout_s 60: on a loaded machine the loopback cloud's trial answer may take longer than the usual 5 s
    config = cloud_config(proxy.base_url, max_retries=0, breaker_failures=1, breaker_cooldown_s=600.0, timeout_s=60.0)
    handle = daemon_factory(config)
    proxy.set(Fault("status", status=500, times=1))
    client = handle.client()
    assert client.ask("Hi", max_tokens=2).done.outcome == "fallback"
    assert client.ask("Hi", max_tokens=2).decision.location == "local"  # open
    assert client.status()["cloud"]["breaker"] == "open"
    config["cloud"]["breaker_cooldown_s"] = 0.1
    write_config(handle.config_path, config)
    assert client.reload()["reloaded"] is True
    time.sleep(0.2)
    trial = client.ask("Hi", max_tokens=2)
    assert (trial.decision.location, trial.done.outcome) == ("cloud", "ok")  # the trial turn goes through
    assert client.status()["cloud"]["breaker"] == "closed"


def test_daily_cap_masks_the_cloud(daemon_factory: Any, proxy: FaultProxy) -> None:
    """A turn whose worst case passes what is left of the cap is not sent, even one the config sends to the
    cloud (routing.mode = cloud); a cap a reload sets below today's spend masks the cloud until midnight."""
    config = cloud_config(proxy.base_url, daily_cap_usd=1e-9)
    handle = daemon_factory(config)
    client = handle.client()
    kept = client.ask("Hi", max_tokens=2)
    assert kept.decision.location == "local" and "cloud.daily_cap_usd" in (kept.decision.notice or "")
    assert "may cost" in kept.decision.reason and proxy.chat_requests() == []
    write_config(handle.config_path, cloud_config(proxy.base_url))  # no cap: the cloud answers, and spends
    assert client.reload()["reloaded"] and client.ask("Hi", max_tokens=2).decision.location == "cloud"
    write_config(handle.config_path, config)
    assert client.reload()["reloaded"]
    capped = client.ask("Hi again", max_tokens=2)
    assert capped.decision.location == "local"
    assert "reached the cap" in capped.decision.reason


def test_api_key_never_reaches_logs_status_errors_or_database(daemon_factory: Any, proxy: FaultProxy) -> None:
    handle = daemon_factory(
        {**cloud_config(proxy.base_url), "log": {"level": "DEBUG"}}, extra_env={"LOCOD_CLOUD_API_KEY": SECRET}
    )
    client = handle.client()
    client.ask("Hi", max_tokens=2)
    proxy.set(Fault("status", status=401))
    client.ask("Hi", max_tokens=2)
    everything = [json.dumps(client.status()), json.dumps(client.decisions()), handle.log()]
    show = subprocess.run(
        locod_command("--config", str(handle.config_path), "config", "show"),
        env=handle.env,
        capture_output=True,
        text=True,
        check=True,
    )
    everything.append(show.stdout)
    handle.stop()
    for path in handle.db_path.parent.iterdir():
        if path.is_file():
            everything.append(path.read_bytes().decode("latin-1"))
    assert not [text[:80] for text in everything if SECRET in text]


def test_a_password_in_base_url_is_never_shown(daemon_factory: Any, proxy: FaultProxy) -> None:
    """status, config and metrics name an endpoint by its URL: without the user:password it may carry (a
    tcp endpoint without a secret serves status and config to every local user)."""
    with_password = proxy.base_url.replace("http://", "http://user:pw-5e1d@")
    handle = daemon_factory({**cloud_config(with_password), "http": {"listen": f"127.0.0.1:{free_port()}"}})
    client = handle.client()
    status = client.status()
    assert list(status["cloud"]["breakers"]) == [proxy.base_url]
    assert client.config()["config"]["cloud"]["models"][0]["base_url"] == proxy.base_url
    metrics = urllib.request.urlopen(status["http"].removesuffix("/v1") + "/metrics", timeout=30).read().decode()
    assert proxy.base_url in metrics
    assert not [text for text in (json.dumps(status), json.dumps(client.config()), metrics) if "pw-5e1d" in text]


def test_key_file_readable_by_others_is_refused(tmp_path: Path, models_dir: Path, proxy: FaultProxy) -> None:
    key = tmp_path / "key"
    key.write_text(SECRET)
    os.chmod(key, 0o644)
    config = cloud_config(proxy.base_url)
    config["cloud"]["models"][0]["api_key_file"] = str(key)
    handle = start_daemon(tmp_path / "d", models_dir, config, wait=False)
    assert handle.proc.wait(60) == 2
    assert "is readable by group or others (mode 644); run `chmod 600" in handle.log()
    os.chmod(key, 0o600)
    good = start_daemon(tmp_path / "d2", models_dir, config)
    good.client().ask("Hi", max_tokens=2)
    assert proxy.chat_requests()[0].headers["authorization"] == f"Bearer {SECRET}"
    good.stop()


def test_a_key_file_that_is_not_a_regular_file_is_refused_without_reading_it(
    tmp_path: Path, daemon_factory: Any, models_dir: Path, proxy: FaultProxy
) -> None:
    """A FIFO as key file: opening it would wait for a writer, on the serving loop. The reload is rejected
    at once with the reason and the daemon keeps serving; a start with it stops with the same reason."""
    key = tmp_path / "key"
    key.write_text(SECRET)
    os.chmod(key, 0o600)
    config = cloud_config(proxy.base_url)
    config["cloud"]["models"][0]["api_key_file"] = str(key)
    handle = daemon_factory(config)
    client = handle.client()
    key.unlink()
    os.mkfifo(key, 0o600)  # nobody ever writes to it
    result = client.reload()
    assert result["reloaded"] is False and "not a regular file" in result["error"] and str(key) in result["error"]
    assert client.ping()["pong"]
    cli = handle.cli("reload", timeout=30)
    assert cli.returncode == 2 and "not a regular file" in cli.stderr
    fresh = start_daemon(tmp_path / "d2", models_dir, config, wait=False)
    assert fresh.proc.wait(60) == 2
    assert "not a regular file" in fresh.log() and "Traceback" not in fresh.log()
    key.unlink()
    key.write_bytes(b"k" * (64 * 1024 + 1))  # a key file of a key's size, not a disk image
    os.chmod(key, 0o600)
    result = client.reload()
    assert result["reloaded"] is False and "over 65536 bytes" in result["error"]


def test_a_key_no_http_header_can_carry_is_refused_by_name_never_quoted(
    tmp_path: Path, daemon_factory: Any, models_dir: Path, proxy: FaultProxy
) -> None:
    """Two keys on two lines, or a stray character pasted in: every call failed as "endpoint unreachable"
    (opening the breaker), and the HTTP library's error quoted the header, key and all. Now the key is
    refused where it is read, naming its source and the character, never the key; a reload keeps the key
    it had."""
    key = tmp_path / "key"
    key.write_text(f"{SECRET}\nsk-second-key\n")
    os.chmod(key, 0o600)
    config = cloud_config(proxy.base_url)
    config["cloud"]["models"][0]["api_key_file"] = str(key)
    refused = start_daemon(tmp_path / "d", models_dir, config, wait=False)
    assert refused.proc.wait(60) == 2
    assert f"api_key_file {key}" in refused.log() and "'\\n'" in refused.log()
    assert SECRET not in refused.log() and "Traceback" not in refused.log()
    key.write_text(SECRET)
    handle = daemon_factory(config)
    client = handle.client()
    key.write_text(f"{SECRET}\u00e9")
    result = client.reload()
    assert result["reloaded"] is False and "printable ASCII" in result["error"] and SECRET not in result["error"]
    assert client.ask("Hi", max_tokens=2).done is not None
    assert proxy.chat_requests()[-1].headers["authorization"] == f"Bearer {SECRET}"


def test_reload_applies_cloud_changes_and_defers_daemon_ones(
    tmp_path: Path, daemon_factory: Any, proxy: FaultProxy
) -> None:
    """A rotated key and a new cloud model apply on reload; a key file others can read rejects the reload
    and keeps the running cloud; a [daemon] change is logged as waiting for a restart."""
    key = tmp_path / "key"
    key.write_text("sk-old")
    os.chmod(key, 0o600)
    config = cloud_config(proxy.base_url, timeout_s=30.0)  # the shared loopback server may still be busy
    config["cloud"]["models"][0]["api_key_file"] = str(key)
    handle = daemon_factory(config)
    client = handle.client()
    client.ask("Hi", max_tokens=2)
    key.write_text("sk-new")
    second = {**config["cloud"]["models"][0], "name": "cloud-b"}
    config["cloud"]["models"].append(second)
    config["daemon"] = {"queue_limit": 64}
    write_config(handle.config_path, config)
    assert client.reload()["reloaded"] is True
    result = client.ask("Hi again", max_tokens=2, model="cloud-b")
    assert result.decision.location == "cloud" and result.done.outcome == "ok"
    assert [r.headers["authorization"] for r in proxy.chat_requests()] == ["Bearer sk-old", "Bearer sk-new"]
    assert "reload: [daemon] changed and take(s) effect at the next restart" in handle.log()
    os.chmod(key, 0o644)
    assert client.reload()["reloaded"] is False
    assert "reload rejected" in handle.log() and "is readable by group or others" in handle.log()
    assert client.ask("Still there?", max_tokens=2, model="cloud-b").done.outcome == "ok"
    assert proxy.chat_requests()[-1].headers["authorization"] == "Bearer sk-new"


def test_combined_faults_every_turn_answered_breaker_engages_and_recovers(
    daemon_factory: Any, proxy: FaultProxy
) -> None:
    """Slow + 5xx + cut streams + garbage, then the network flapping back: every turn still ends with an
    answer, each failure is recorded as a fallback with its cause, the breaker opens and closes again."""
    handle = daemon_factory(
        # a timeout a loaded machine's loopback "cloud" still answers within (1 s, then 3 s under the load
        # of a test run beside it, failed the healthy turn)
        cloud_config(proxy.base_url, max_retries=0, timeout_s=8.0, breaker_failures=3, breaker_cooldown_s=5.0)
    )
    client = handle.client()
    proxy.faults = [
        Fault("delay", delay_s=16.0, times=1),
        Fault("status", status=502, times=1),
        Fault("cut", cut_after_chunks=2, times=1),
    ]
    outcomes = [client.ask(f"turn {i}", max_tokens=6).done.outcome for i in range(3)]
    assert outcomes == ["fallback"] * 3
    assert client.status()["cloud"]["breaker"] == "open"
    masked = client.ask("while the breaker is open", max_tokens=2)
    assert masked.decision.location == "local" and "endpoint is open" in masked.decision.reason
    time.sleep(5.2)  # the cooldown: long enough that a slow fallback answer does not outlast it
    proxy.faults = [Fault("garbage", times=1)]  # the trial turn fails: open again
    assert client.ask("trial", max_tokens=4).done.outcome == "fallback"
    time.sleep(5.2)  # the cooldown: long enough that a slow fallback answer does not outlast it
    recovered = client.ask("back online", max_tokens=4)  # the next trial succeeds: closed
    assert recovered.done.outcome == "ok" and recovered.done.location == "cloud"
    assert client.status()["cloud"]["breaker"] == "closed"
    rows = handle.rows()
    causes = [r["error"] for r in rows if r["outcome"] == "fallback"]
    assert len(causes) == 4 and all(causes)
    assert all(r["outcome"] in ("ok", "fallback") for r in rows)


# -- replies that break the protocol: usage, Retry-After, deltas, redirects ----------------------------


@pytest.fixture
def patient_cloud(daemon_factory: Any, proxy: FaultProxy) -> DaemonHandle:
    """cloud_daemon with a 30 s timeout (a loaded test machine's first token can take over 5 s) and a
    breaker that does not open within one test: these tests count requests and read each turn's cause."""
    config = cloud_config(proxy.base_url, timeout_s=30.0, breaker_failures=100)
    return daemon_factory(config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": "x", "completion_tokens": 1, "total_tokens": 1},
        {"prompt_tokens": None, "completion_tokens": None, "total_tokens": None},
        {"prompt_tokens": -100000000, "completion_tokens": 1, "total_tokens": 1},
        {"prompt_tokens": 1, "completion_tokens": 1e308, "total_tokens": 1},
        {"prompt_tokens": 1, "completion_tokens": float("inf"), "total_tokens": 1},
        {"prompt_tokens": True, "completion_tokens": [2], "total_tokens": 1},
    ],
)
def test_unbelievable_usage_is_estimated_never_a_failed_turn_or_a_negative_cost(
    patient_cloud: DaemonHandle, proxy: FaultProxy, usage: dict[str, Any]
) -> None:
    cloud_daemon = patient_cloud
    proxy.set(Fault("usage", usage=usage))
    client = cloud_daemon.client()
    for prompt in ("Name a planet.", "Name a colour."):
        result = client.ask(prompt, max_tokens=8, temperature=0.0)
        assert result.done.outcome == "ok" and result.done.location == "cloud"
        assert result.done.cost_estimated is True
    rows = cloud_daemon.rows()
    for row in rows:
        assert row["cost_estimated"] == 1 and 0 < row["cost_usd"] < 0.001
        assert 0 < row["tokens_in"] < 1000 and 0 < row["tokens_out"] <= 8
    spent = client.status()["cloud"]["spent_today_usd"]
    assert spent == pytest.approx(sum(row["cost_usd"] for row in rows), abs=1e-6)
    log = cloud_daemon.log()
    assert log.count("reported usage that cannot be right") == 1 and "Traceback" not in log


def test_any_retry_after_is_clamped_or_ignored(patient_cloud: DaemonHandle, proxy: FaultProxy) -> None:
    """Each form of Retry-After on a 429: the turn falls back, retried (wait clamped to 0..1 s) or not
    (a wait over max_retry_after_s), never an internal error."""
    handle = patient_cloud
    client = handle.client()
    headers = {
        "-5": 3,  # 3 requests: the call and its 2 retries (cloud.max_retries), none waiting
        "-inf": 3,
        "nan": 3,
        "soon, please": 3,
        "Wed, 21 Oct 2015 07:28:00 GMT": 3,  # a date past: no wait
        "inf": 1,  # over max_retry_after_s: not retried
        "1e400": 1,
        "Fri, 01 Jan 9999 00:00:00 GMT": 1,
    }
    for header, requests in headers.items():
        proxy.seen.clear()
        proxy.set(Fault("status", status=429, retry_after=header))
        result = client.ask("Say something nice.", max_tokens=4)
        assert result.fallback is not None and result.fallback.cause == "cloud_http", header
        assert result.done.outcome == "fallback" and result.done.location == "local", header
        assert len(proxy.chat_requests()) == requests, header
    assert "Traceback" not in handle.log() and "internal" not in handle.log()


def test_a_delta_that_is_not_text_is_an_invalid_reply_and_none_of_it_reaches_the_client(
    patient_cloud: DaemonHandle, proxy: FaultProxy
) -> None:
    proxy.set(Fault("bad_delta"))
    result = patient_cloud.client().ask("Say something nice.", max_tokens=8)
    assert result.fallback is not None and result.fallback.cause == "cloud_invalid_reply"
    assert "a delta's content is an array, not text" in result.fallback.message
    kinds = [f.type for f in result.frames]
    assert "delta" not in kinds[: kinds.index("fallback")]  # nothing of the list was passed on
    assert all(isinstance(f.text, str) for f in result.frames if f.type == "delta")
    assert result.done.outcome == "fallback" and result.done.location == "local"


def test_a_redirect_is_not_followed_and_names_where_it_pointed(
    patient_cloud: DaemonHandle, proxy: FaultProxy, cloud_server: Any
) -> None:
    elsewhere = FaultProxy(cloud_server.base_url.rsplit("/v1", 1)[0]).start()  # records anything sent to it
    try:
        target = elsewhere.base_url.rsplit("/v1", 1)[0]
        proxy.set(Fault("redirect", status=307, location=f"{target}/v1/chat/completions"))
        result = patient_cloud.client().ask("hello there", max_tokens=4)
        assert result.fallback is not None and result.fallback.cause == "cloud_redirect"
        assert target.removeprefix("http://") in result.fallback.message and "not followed" in result.fallback.message
        assert result.done.outcome == "fallback" and elsewhere.seen == []
    finally:
        elsewhere.stop()


def test_when_the_cloud_and_then_the_fallback_fail_the_error_names_the_clouds_code(daemon_factory: Any) -> None:
    """A prompt too long for the local context goes to the cloud; with the cloud down, the fallback cannot
    fit it either: the error frame carries the cloud's kind and code (what failed first), the message both."""
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens here
    config = cloud_config(dead, mode="auto", max_retries=0)
    config["local"] = {
        "models": [{"name": "smollm2-135m-instruct", "path": "SmolLM2-135M-Instruct.Q4_1.gguf", "n_ctx": 256}]
    }
    handle = daemon_factory(config)
    long_prompt = "Here is a list: " + "apple " * 300 + "\nWhat fruit is in the list?"
    with pytest.raises(CloudError) as info:
        handle.client().ask(long_prompt, max_tokens=4)
    assert info.value.code == "cloud_unreachable" and "local fallback failed" in info.value.message
    (row,) = handle.rows()
    assert row["outcome"] == "error" and "local fallback failed" in row["error"]


# -- a proxy named by the environment ---------------------------------------------------------------


class ForwardProxy:
    """An HTTP forward proxy on loopback that records the absolute URLs it is asked for and fetches each
    from ``upstream`` (host, port) whatever host it names: the only way to the cloud of a test whose
    base_url names a host that does not exist."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.asked: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                proxy.asked.append(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                conn = http.client.HTTPConnection(*upstream, timeout=60)
                conn.request("POST", urllib.parse.urlsplit(self.path).path, body, {"Content-Type": "application/json"})
                answer = conn.getresponse()
                data = answer.read()  # whole, then sent on: a stream arrives all at once, still a stream
                self.send_response(answer.status)
                self.send_header("Content-Type", answer.getheader("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


def test_the_cloud_is_reached_through_the_proxy_the_environment_names(
    daemon_factory: Any, cloud_server: CloudServer
) -> None:
    """The cloud client has a transport of its own, and that read no proxy variable: a device behind a proxy
    never reached its cloud, and one meant to go through a proxy went around it without a word. The probe
    that says whether the cloud is reachable times the same hop: the proxy."""
    cloud = urllib.parse.urlsplit(cloud_server.base_url)
    proxy = ForwardProxy((cloud.hostname or "", cloud.port or 80))
    try:
        config = cloud_config("http://cloud.invalid/v1", timeout_s=60.0)  # reachable through the proxy only
        handle = daemon_factory(config, extra_env={"http_proxy": proxy.url})
        result = handle.client().ask("Hello", max_tokens=4, force="cloud")
        assert result.done.outcome == "ok" and result.done.location == "cloud"
        assert proxy.asked == ["http://cloud.invalid/v1/chat/completions"]
        wait_for(lambda: handle.client().status()["telemetry"]["cloud_reachable"], 30, "the probe of the proxy")
    finally:
        proxy.server.shutdown()


def test_proxy_variables_are_read_as_curl_reads_them() -> None:
    model = CloudModelConfig(name="m", base_url="https://api.example.com/v1", model="m")
    assert proxy_for(model, "c", {}) is None
    assert proxy_for(model, "c", {"HTTPS_PROXY": "http://p:3128"}) == "http://p:3128"
    assert proxy_for(model, "c", {"http_proxy": "http://p:3128"}) is None  # the scheme's own variable only
    assert proxy_for(model, "c", {"ALL_PROXY": "http://all:1", "https_proxy": "http://s:2"}) == "http://s:2"
    for no_proxy in (".example.com", "example.com", "localhost, api.example.com:443", "*"):
        assert proxy_for(model, "c", {"https_proxy": "http://p:3128", "NO_PROXY": no_proxy}) is None, no_proxy
    assert proxy_for(model, "c", {"https_proxy": "http://p:3128", "no_proxy": "ample.com"}) == "http://p:3128"
    with pytest.raises(ConfigError) as refused:  # never around the proxy the user set, without a word
        proxy_for(model, "c", {"ALL_PROXY": "socks5://user:secret@p:1080"})
    assert "$ALL_PROXY names a proxy locod cannot use" in refused.value.message
    assert "secret" not in refused.value.message
