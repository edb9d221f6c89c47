"""The tenth review's findings, each against a real daemon with the real model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

import openai
import pytest

from locod.client import Client
from locod.daemon import attachments as att
from locod.daemon.config import AttachmentsConfig
from locod.daemon.prompts import LocalQuestion
from locod.protocol import Attachment

from .conftest import cloud_config, wait_for
from .faultproxy import Fault, FaultProxy
from .test_escalation import CLOUD
from .test_http import http_daemon, png, sdk


def test_a_daemon_whose_runtime_directory_another_took_leaves_its_socket_alone(daemon_factory: Any) -> None:
    """Review finding: a daemon whose runtime directory was removed, and then made again by a second daemon
    (another state directory, the same runtime directory), took the second's socket file for its own: it
    stayed quiet, unreachable, and its stop removed the second's socket, leaving the second unreachable too.
    Now it says another daemon serves there and names the pid to stop it by, and its stop leaves the
    second's socket in place."""
    first = daemon_factory(name="a")
    run = first.home / "run"
    shutil.rmtree(run)  # the first binds its socket again at its next look (every 10 s) ...
    wait_for(lambda: (run / "locod.sock").exists(), 30, "the socket to be bound again")
    shutil.rmtree(run)  # ... and removed again right after it, the second starts long before the next
    second = daemon_factory(name="b", extra_env={"LOCOD_RUNTIME_DIR": str(run)})
    wait_for(lambda: "another locod daemon" in first.log(), 30, "the first daemon to see the second")
    assert f"kill {first.proc.pid}" in first.log()
    assert first.stop() == 0
    assert (run / "locod.sock").exists()
    client = Client(f"ipc://{run / 'locod.sock'}", timeout_s=30)
    try:
        assert client.status()["pid"] == second.proc.pid
    finally:
        client.close()


def test_decisions_of_a_number_past_sqlites_integers_finds_none(daemon_factory: Any) -> None:
    """Review finding: `locod decisions ID` with a number past SQLite's 64-bit integers (a pasted timestamp in
    nanoseconds, a typo) raised OverflowError in the daemon's reader, and in the CLI's own reader with the
    daemon stopped; now it finds no record, as any id nothing has does."""
    handle = daemon_factory()
    huge = "9" * 30
    for running in (True, False):
        shown = handle.cli("decisions", huge)
        assert shown.returncode != 0 and f"no decision record has the id {huge!r}" in shown.stderr, shown.stderr
        assert "Traceback" not in shown.stderr and ("not running" in shown.stderr) != running
        if running:
            assert handle.stop() == 0
    assert "Traceback" not in handle.log()


@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory another user owns needs root")
def test_a_runtime_directory_another_user_made_again_gets_no_socket(daemon_factory: Any) -> None:
    """Review finding: once the runtime directory was removed (systemd-tmpfiles ageing /tmp/locod-$UID),
    another user could make it again with a ``locod.lock`` file in it; the daemon took the lock file's
    presence for its own lock and bound its socket in that user's directory, where that user could swap
    it for one of their own and read what clients send. Now the daemon binds only in a directory it could
    lock, which refuses a directory another user owns."""
    handle = daemon_factory()
    run = handle.home / "run"
    shutil.rmtree(run)
    run.mkdir(mode=0o777)
    (run / "locod.lock").touch()
    os.chown(run, 65534, 65534)
    os.chmod(run, 0o777)
    wait_for(lambda: "cannot bind" in handle.log(), 30, "the daemon's look at its socket")
    assert "is not a directory owned by this user" in handle.log()
    assert not (run / "locod.sock").exists()


def test_a_waiting_shadow_question_keeps_its_excerpts_not_its_attachments() -> None:
    """Review finding: a shadow job, queued (up to 16) until the local model is idle, held its turn's whole
    prepared attachments in its ``LocalQuestion``: every chunk of each document and each image's JPEG, up to
    ``daemon.max_message_bytes`` a turn, where it had held a few kilobytes of excerpts. Now the queued
    question keeps the chunks its prompts can select, and gives the same prompt at every budget it tries."""
    config = AttachmentsConfig()
    terms = att.terms("What does the report say about river levels?")
    filler = "".join(
        f"Paragraph {i}: the river levels rose by {i % 7} metres near station {i}.\n" for i in range(40_000)
    )
    report = att.prepare(Attachment("document", "report.txt"), filler.encode(), terms, config)
    notes = att.prepare(Attachment("document", "notes.txt"), ("河流水位上升。" * 50_000).encode(), terms, config)
    image = att.prepare(Attachment("image", "photo.png"), png(640, 480), terms, config)
    asked = LocalQuestion([], "What does the report say about river levels?", (report, image, notes), 2048)
    kept = asked.kept()
    for budget in asked.doc_budgets():
        assert kept.messages(budget) == asked.messages(budget)
    assert [a.name for a in kept.attachments] == ["report.txt", "notes.txt"]
    whole = sum(len(c.text) for a in asked.attachments for c in a.chunks)
    assert sum(len(c.text) for a in kept.attachments for c in a.chunks) * 100 < whole


def test_a_turn_that_fails_after_its_decision_names_its_record(daemon_factory: Any, proxy: FaultProxy) -> None:
    """Review finding: a stream that failed before its first text, now answered with its HTTP status, lost the
    ``x-locod-decision`` header its 200 had carried (an unstreamed failure never had it): the record of a
    failed turn, the one worth reading, could not be found by `locod decisions ID`. Now a failure after the
    decision carries the decision's headers."""
    handle, base = http_daemon(daemon_factory, cloud_config(proxy.base_url, max_retries=0))
    proxy.set(Fault(kind="status", status=500))
    too_long_for_local: Any = [{"role": "user", "content": "word " * 2500}]
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as failed:
            sdk(base).chat.completions.create(model=CLOUD, messages=too_long_for_local, max_tokens=4, stream=stream)
        assert failed.value.status_code == 502
        decision = failed.value.response.headers["x-locod-decision"]
        assert failed.value.response.headers["x-locod-location"] == "cloud"  # no fallback text came
        shown = handle.cli("decisions", decision, "--json")
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)[0]["outcome"] == "error"


def test_a_socket_that_could_not_be_bound_again_is_bound_once_it_can(daemon_factory: Any) -> None:
    """Review finding: when binding the removed socket again failed (its file system read-only for a while,
    out of inodes), the socket stayed unbound, and every later look failed at unbinding it ("No such file or
    directory") before it tried to bind: the daemon stayed unreachable once the file system was writable
    again. Now a later look binds it."""
    handle = daemon_factory()
    run = handle.home / "run"
    (run / "locod.sock").unlink()
    # A read-only view of the runtime directory over it (the daemon's lock file stays open on the one below)
    if subprocess.run(["mount", "--bind", str(run), str(run)]).returncode:
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(run)], check=True)
        wait_for(lambda: "cannot bind" in handle.log(), 30, "a failed bind")
    finally:
        subprocess.run(["umount", str(run)], check=True)
    wait_for(lambda: (run / "locod.sock").exists(), 30, "the socket to be bound again")
    assert handle.client().status()["pid"] == handle.proc.pid
    assert handle.stop() == 0
