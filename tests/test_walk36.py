"""Walk 36: a laptop user who runs Ollama and llama.cpp's server, setting locod up from README.md: their own
GGUF at a path with spaces and accents, llama.cpp's server as the cloud, the CLI with a photo and notes,
`locod decisions ID` on a turn whose cloud failed, and the user service's install and uninstall without
systemd. Real daemons (the embedded model), the loopback cloud behind the fault proxy, real scripts."""

from __future__ import annotations

import os
import signal
import site
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import DaemonHandle, wait_for
from .faultproxy import Fault, FaultProxy
from .test_escalation import LOCAL, _daemon, _head
from .test_http import png

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def escalating(daemon_factory: Any, tmp_path: Path, proxy: FaultProxy) -> DaemonHandle:
    """A daemon routing to the loopback cloud whose local answers are all unsure: each escalates."""
    return _daemon(daemon_factory, tmp_path, proxy, _head(min_weight=1000.0, bias=10.0), "walk")  # type: ignore[no-any-return]


def test_a_local_answer_that_escalated_is_not_said_to_have_answered(escalating: DaemonHandle, tmp_path: Path) -> None:
    """Walk finding: `locod ask "Describe this" --attach photo.jpg` printed "[answered locally by a model that
    cannot see images; not seen: photo.jpg]", then "[the local answer was not sure enough ...; gpt-mini answers
    instead]": the decision's notice was said before its local answer was judged, of an answer never shown.
    The notice now waits for the answer it is about; an escalation or a fallback says what the new one missed."""
    photo = tmp_path / "photo rouge.png"
    photo.write_bytes(png())
    escalated = escalating.cli("ask", "What colour is this?", "--attach", str(photo), "--max-tokens", "8")
    assert escalated.returncode == 0, escalated.stderr
    assert escalating.rows()[-1]["outcome"] == "escalated"
    assert "answered locally" not in escalated.stderr and "answers instead" in escalated.stderr, escalated.stderr
    kept = escalating.cli("ask", "What colour is this?", "--attach", str(photo), "--model", LOCAL, "--max-tokens", "4")
    assert kept.returncode == 0, kept.stderr
    notice = "[answered locally by a model that cannot see images; not seen: photo rouge.png]"
    assert kept.stderr.startswith(notice), kept.stderr  # the answer shown is the local one: it is said


def test_a_fallback_after_an_escalation_is_not_explained_as_the_cloud_answering(
    escalating: DaemonHandle, proxy: FaultProxy
) -> None:
    """Walk finding: a turn whose unsure local answer escalated to a cloud that then failed was answered by the
    local model again, and `locod decisions ID` said "answered: the cloud call failed, so the local model
    answered instead" and, two lines below, of the local answer: "not shown: the cloud answered instead"."""
    proxy.set(Fault("status", status=500))  # every try: the escalation's call fails
    asked = escalating.cli("ask", "Name a colour.", "--max-tokens", "8")  # over escalate_tokens: no whole answer held
    assert asked.returncode == 0, asked.stderr
    (row,) = escalating.rows("SELECT id, outcome FROM decisions ORDER BY id DESC LIMIT 1")
    assert row["outcome"] == "fallback", row
    explained = escalating.cli("decisions", str(row["id"]))
    assert explained.returncode == 0, explained.stderr
    assert "the cloud answered instead" not in explained.stdout, explained.stdout
    dropped = "not shown: the turn escalated, the cloud failed, and the local model answered again from the start"
    assert dropped in explained.stdout, explained.stdout


def test_chat_attaches_a_typed_path_with_spaces_as_one_file(daemon: DaemonHandle, tmp_path: Path) -> None:
    """Walk finding: in `locod chat`, `/attach /home/me/notes été.md` (typed, not dropped: no quotes) was read
    as two files, "/home/me/notes" and "été.md", neither there. A typed path that names a file is that file;
    quoted or several paths are read as before."""
    notes, other = tmp_path / "mes notes été.md", tmp_path / "other.md"
    notes.write_text("The meeting is on Tuesday.\n")
    other.write_text("Bring the budget.\n")
    typed = f"/attach {notes} \n/attach '{notes}' {other}\nWhen is the meeting?\n"
    chat = daemon.cli("chat", "--max-tokens", "4", stdin=typed)
    assert chat.returncode == 0, chat.stderr
    assert "cannot read" not in chat.stderr, chat.stderr
    assert chat.stderr.count(f"[{notes}: attached to the next question]") == 2, chat.stderr
    assert f"[{other}: attached to the next question]" in chat.stderr, chat.stderr
    (row,) = daemon.rows("SELECT attachments_offered FROM decisions")
    assert row["attachments_offered"].count('"name"') == 3, row


def _venv_running_locod(venv: Path) -> None:
    """A real venv at ``venv`` whose ``bin/locod`` runs this checkout's locod (its site-packages reached
    through a .pth file): what install.sh makes, without its minutes of pip."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = subprocess.run(
        [str(venv / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    added = "; ".join(f"site.addsitedir({path!r})" for path in site.getsitepackages())
    Path(purelib, "locod-walk36.pth").write_text(f"import site; {added}\n")
    (venv / "bin/locod").write_text(f"#!{venv}/bin/python\nfrom locod.cli import main\nmain()\n")
    (venv / "bin/locod").chmod(0o755)


def _user_env(home: Path, handle: DaemonHandle) -> dict[str, str]:
    """The scripts' environment: a user whose daemon is ``handle``'s (its state, socket and models)."""
    env = {k: v for k, v in handle.env.items() if k.startswith("LOCOD_") or k in ("PATH", "TMPDIR")}
    return {**env, "HOME": str(home), "XDG_DATA_HOME": str(home / "data"), "XDG_CONFIG_HOME": str(home / "config")}


def test_uninstall_stops_a_daemon_that_runs_from_the_venv_it_removes(
    daemon_factory: Any, models_dir: Path, tmp_path: Path
) -> None:
    """Walk finding: without systemd, install.sh says to run the daemon by hand from its venv; uninstall.sh
    then removed that venv, said "removed locod", and the daemon ran on with its code gone. It is stopped
    first now (turns in flight finish); a daemon run from elsewhere (a checkout's) is left alone."""
    home = tmp_path / "home"
    venv = home / "data/locod/venv"
    _venv_running_locod(venv)
    elsewhere = daemon_factory(name="checkout")
    env = _user_env(home, elsewhere)
    script = ["bash", str(REPO / "scripts/uninstall.sh"), "--user"]
    left = subprocess.run(script, capture_output=True, text=True, env=env, timeout=120)
    assert left.returncode == 0 and "stopping" not in left.stderr, left.stderr
    assert elsewhere.proc.poll() is None
    elsewhere.stop()

    _venv_running_locod(venv)
    log = tmp_path / "installed.log"
    with log.open("wb") as out:
        installed = subprocess.Popen([str(venv / "bin/locod"), "serve"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "serving on" in log.read_text(errors="replace"), 120, "the installed daemon to serve")
        removed = subprocess.run(script, capture_output=True, text=True, env=env, timeout=120)
        assert removed.returncode == 0, removed.stderr
        said = f"stopping the locod daemon that runs from {venv} (pid {installed.pid}): turns in flight finish first"
        assert said in removed.stderr, removed.stderr
        assert installed.wait(30) == 0 and not venv.exists()
    finally:
        if installed.poll() is None:
            installed.send_signal(signal.SIGTERM)
            installed.wait(60)


@pytest.mark.skipif(os.path.isdir("/run/systemd/system"), reason="it would start the service on this machine")
def test_install_without_systemd_says_that_a_daemon_started_by_hand_runs_on(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """Walk finding: after scripts/quickstart.sh, `scripts/install.sh --user` (where systemd does not run) said
    "run the daemon by hand with .../venv/bin/locod serve", which then failed: "another locod daemon is already
    running". It now says that one runs, with its old code, and to stop it first. (With systemd the service
    exited 4 on that daemon's state and retried every 2 s; install.sh stops it first there: not run here.)"""
    home = tmp_path / "home"
    venv = home / "data/locod/venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin/python").write_text("#!/bin/sh\nexit 0\n")  # pip's calls answered at once
    (venv / "bin/locod").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m locod.cli "$@"\n')  # the real command
    for name in ("python", "locod"):
        (venv / "bin" / name).chmod(0o755)
    quickstarted = daemon_factory(name="quickstart")
    env = _user_env(home, quickstarted)
    installed = subprocess.run(
        ["bash", str(REPO / "scripts/install.sh"), "--user"], capture_output=True, text=True, env=env, timeout=120
    )
    assert installed.returncode == 0, installed.stderr
    said = (
        "a locod daemon started by hand is running, with the code it started with: stop it "
        f'("{venv}/bin/locod" stop), then run the one installed by hand with "{venv}/bin/locod" serve'
    )
    assert said in installed.stderr, installed.stderr
    assert quickstarted.proc.poll() is None  # told, not stopped: no service takes its place here
