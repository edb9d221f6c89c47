"""The seventeenth walk: a new user whose turns carry photos, screenshots, PDFs and text files, following
README.md, docs/protocol.md and docs/http.md to learn what can be attached, where each file went and which
limit a refusal hit. One real daemon (the embedded model) with the loopback cloud behind the recording
proxy serves every test, on real files made here."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from locod.errors import LocodError
from locod.protocol import Attachment, EscalatedFrame

from .conftest import SECRET, CloudServer, DaemonHandle, cloud_config, free_port, start_daemon
from .faultproxy import FaultProxy
from .test_escalation import _daemon, _head

MAX_BYTES = 5_000_000


@contextmanager
def cloud_walk(
    cloud_server: CloudServer, home: Path, models_dir: Path, shape: Callable[[dict[str, Any]], None]
) -> Iterator[tuple[DaemonHandle, FaultProxy, int]]:
    """(daemon, proxy, HTTP port): every turn goes to the cloud (routing.mode = cloud) through a proxy that
    shows what it receives, the HTTP door on; ``shape`` edits the config before the daemon starts."""
    proxy = FaultProxy(cloud_server.base_url.rsplit("/v1", 1)[0]).start()
    port = free_port()
    config = cloud_config(proxy.base_url, timeout_s=120.0)
    config["http"] = {"listen": f"127.0.0.1:{port}"}
    shape(config)
    daemon = start_daemon(home, models_dir, config, extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    try:
        yield daemon, proxy, port
    finally:
        daemon.stop()
        proxy.stop()


@pytest.fixture(scope="module")
def walk(cloud_server: CloudServer, tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Any]:
    """cloud_walk's, with a vision-less cloud model beside (forced local where a test says so)."""
    home = tmp_path_factory.mktemp("walk17")
    (home / "files").mkdir()

    def shape(config: dict[str, Any]) -> None:
        blind = {**config["cloud"]["models"][0], "name": "cloud-blind", "vision": False}
        config["cloud"]["models"].append(blind)  # the same endpoint, configured as a model that takes no images
        config["attachments"] = {"max_bytes": MAX_BYTES, "max_count": 3, "image_max_pixels": 4_000_000}
        config["paths"] = {"allow_dirs": [str(home / "files")]}  # where a client may name a file by its path

    with cloud_walk(cloud_server, home, models_dir, shape) as walked:
        yield walked


def ask(daemon: DaemonHandle, *args: str) -> Any:
    return daemon.cli("ask", "Describe what I attached", "--max-tokens", "4", *args, timeout=300)


def last_question(proxy: FaultProxy) -> Any:
    """The content of the last user message the cloud received."""
    return proxy.chat_requests()[-1].body["messages"][-1]["content"]


def sent_image(proxy: FaultProxy) -> np.ndarray:
    url = next(p["image_url"]["url"] for p in last_question(proxy) if p["type"] == "image_url")
    return cv2.imdecode(np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)


def test_a_screenshot_with_a_transparent_background_reaches_the_cloud_on_white(walk: Any, tmp_path: Path) -> None:
    """Its transparent pixels hold black, as they often do: decoded without its alpha channel, black text on
    it became a black image."""
    daemon, proxy, _ = walk
    pixels = np.zeros((200, 400, 4), np.uint8)
    pixels[80:120, 50:350] = (0, 0, 0, 255)  # an opaque black bar; the rest transparent black
    screenshot = tmp_path / "screenshot.png"
    screenshot.write_bytes(cv2.imencode(".png", pixels)[1].tobytes())
    assert ask(daemon, "--attach", str(screenshot)).returncode == 0
    seen = sent_image(proxy)
    assert seen[10, 10].min() > 240 and seen[100, 200].max() < 15, (seen[10, 10], seen[100, 200])


def test_text_files_reach_the_cloud_as_written(walk: Any, tmp_path: Path) -> None:
    """Code keeps each paragraph's indentation (a method after a blank line lost it); a Windows "Unicode"
    (UTF-16) file is read, not refused; a note that begins "BM" is a document, not a bitmap."""
    daemon, proxy, _ = walk
    code = "class Greeter:\n    def __init__(self):\n        self.n = 1\n\n    def greet(self):\n        return 1\n"
    (tmp_path / "greeter.py").write_text(code)
    assert ask(daemon, "--attach", str(tmp_path / "greeter.py")).returncode == 0
    assert code.strip() in last_question(proxy)
    (tmp_path / "notes.txt").write_bytes("Meeting notes: the budget is 4200 euros.\r\n".encode("utf-16"))
    done = ask(daemon, "--attach", str(tmp_path / "notes.txt"))
    assert done.returncode == 0, done.stderr
    assert "the budget is 4200 euros" in last_question(proxy)
    (tmp_path / "car").write_text("BMW service: brakes replaced at 42,000 km, next oil change in May.\n")
    done = ask(daemon, "--attach", str(tmp_path / "car"))
    assert done.returncode == 0, done.stderr
    assert "brakes replaced" in last_question(proxy)


def test_files_locod_cannot_read_are_refused_by_name_and_kind(walk: Any, tmp_path: Path) -> None:
    """An iPhone photo (HEIC) was called a document that is not UTF-8; a PDF or a .docx, text that is not
    UTF-8: each refusal now says what the file is and what locod reads."""
    daemon, proxy, _ = walk
    (tmp_path / "IMG_0002.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(500))
    (tmp_path / "report.pdf").write_bytes(b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog >>\nendobj\n%%EOF\n")  # ASCII only
    with zipfile.ZipFile(tmp_path / "letter.docx", "w") as docx:
        docx.writestr("word/document.xml", "<w:document>Hello</w:document>")
    expected = {"IMG_0002.HEIC": "is a HEIC image", "report.pdf": "is a PDF", "letter.docx": "is a ZIP archive"}
    before = len(proxy.chat_requests())
    for name, what in expected.items():
        refused = ask(daemon, "--attach", str(tmp_path / name))
        assert refused.returncode == 1, refused
        assert f"'{name}'" in refused.stderr and what in refused.stderr, refused.stderr
        assert "convert it" in refused.stderr, refused.stderr
    assert len(proxy.chat_requests()) == before


def test_each_door_names_the_limit_a_refusal_hit(walk: Any, tmp_path: Path) -> None:
    daemon, _, port = walk
    (tmp_path / "log.txt").write_text("x" * (MAX_BYTES + 1))
    (tmp_path / "a.txt").write_text("short")
    over = ask(daemon, "--attach", str(tmp_path / "log.txt"))
    assert over.returncode == 1 and "(attachments.max_bytes)" in over.stderr, over.stderr
    many = ask(daemon, *[arg for _ in range(4) for arg in ("--attach", str(tmp_path / "a.txt"))])
    assert many.returncode == 1 and "at most 3 allowed (attachments.max_count)" in many.stderr, many.stderr
    (tmp_path / "scan.png").write_bytes(cv2.imencode(".png", np.zeros((2000, 2100), np.uint8))[1].tobytes())
    large = ask(daemon, "--attach", str(tmp_path / "scan.png"))
    assert large.returncode == 1 and "4000000 pixels, attachments.image_max_pixels" in large.stderr, large.stderr
    url = "data:image/png;base64," + base64.b64encode(bytes(MAX_BYTES + 1)).decode()
    parts = [{"type": "text", "text": "Describe"}, {"type": "image_url", "image_url": {"url": url}}]
    body = {"model": "auto", "max_tokens": 4, "messages": [{"role": "user", "content": parts}]}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=300)
    error = json.loads(refused.value.read())["error"]
    assert refused.value.code == 413 and "(attachments.max_bytes)" in error["message"], error


def test_decisions_say_what_left_the_device_and_what_no_model_saw(walk: Any, tmp_path: Path) -> None:
    """`locod decisions ID` said "uploaded" for a photo the cloud got as a smaller JPEG, and "kept on
    device" for one the local model answered without seeing."""
    daemon, proxy, _ = walk
    photo = tmp_path / "IMG_0001.JPG"
    photo.write_bytes(cv2.imencode(".jpg", np.full((1500, 2000, 3), 90, np.uint8))[1].tobytes())
    for force in ("cloud", "local"):
        done = ask(daemon, "--attach", str(photo), "--force", force, "--json")
        assert done.returncode == 0, done.stderr
        frames = [json.loads(line) for line in done.stdout.splitlines()]
        decision = next(f["decision"] for f in frames if f["type"] == "decision")
        explained = daemon.cli("decisions", str(decision)).stdout
        if force == "cloud":
            height, width = sent_image(proxy).shape[:2]
            assert f"IMG_0001.JPG (uploaded as a {width}x{height} JPEG of " in explained, explained
        else:
            unseen = "IMG_0001.JPG (kept on device; no model saw it, as local models read no images)"
            assert unseen in explained, explained


def test_a_private_file_named_as_an_uploaded_one_is_never_said_uploaded(walk: Any, tmp_path: Path) -> None:
    """`--attach work/notes.md --private home/notes.md`: both were called notes.md, and `locod decisions ID`
    said the private one was uploaded too (the record names what went, and the names were the same)."""
    daemon, proxy, _ = walk
    (tmp_path / "work").mkdir()
    (tmp_path / "home").mkdir()
    (tmp_path / "work" / "notes.md").write_text("The picnic is on Saturday.\n")
    (tmp_path / "home" / "notes.md").write_text("My bank PIN is 9911.\n")
    public, private = str(tmp_path / "work" / "notes.md"), str(tmp_path / "home" / "notes.md")
    done = ask(daemon, "--attach", public, "--private", private, "--json")
    assert done.returncode == 0, done.stderr
    assert "9911" not in json.dumps(proxy.chat_requests()[-1].body) and "picnic" in last_question(proxy)
    decision = next(f for f in map(json.loads, done.stdout.splitlines()) if f["type"] == "decision")
    assert decision["attachments_sent"] == [public], decision
    explained = daemon.cli("decisions", str(decision["decision"])).stdout
    assert f"{private} (private, kept on device)" in explained and f"{public} (uploaded" in explained, explained
    same = [Attachment("document", "notes.md", data=b"The picnic is on Saturday.\n")]
    same.append(Attachment("document", "notes.md", data=b"My bank PIN is 9911.\n", private=True))
    with daemon.client() as client:  # a protocol client that names both alike: the record's view is still right
        result = client.ask("When is the picnic?", attachments=same, max_tokens=4, force="cloud")
    explained = daemon.cli("decisions", str(result.decision.decision)).stdout
    assert "notes.md (private, kept on device)" in explained and "notes.md (uploaded" in explained, explained


def photo_png() -> bytes:
    return cv2.imencode(".png", np.full((60, 80, 3), 200, np.uint8))[1].tobytes()


def test_a_cloud_answer_made_without_an_image_says_so(walk: Any, tmp_path: Path) -> None:
    """A cloud model that takes no images (`vision = false`) answered a turn with a photo, and nothing told the
    user that no model saw it: the notice was made for local answers only."""
    daemon, proxy, _ = walk
    (tmp_path / "photo.png").write_bytes(photo_png())
    done = ask(daemon, "--attach", str(tmp_path / "photo.png"), "--model", "cloud-blind")
    assert done.returncode == 0, done.stderr
    assert isinstance(last_question(proxy), str)  # no image part reached it
    assert "answered in the cloud without uploading every image; not seen: photo.png" in done.stderr, done.stderr


def test_an_escalation_says_the_cloud_is_not_sent_an_image(
    daemon_factory: Any, tmp_path: Path, proxy: FaultProxy
) -> None:
    """An unsure local answer (which saw no image) escalated to a cloud answer made without the photo too, and
    the escalation's message said nothing of it (an HTTP client was left with a notice about the local answer)."""
    head = _head(min_weight=1000.0, bias=10.0)
    handle = _daemon(daemon_factory, tmp_path, proxy, head, "blind", {"weight_policy": 0.0})
    photo = Attachment("image", "photo.png", data=photo_png())
    turn = handle.client().chat("What is the plural of mouse?", attachments=[photo], max_tokens=24, temperature=0.0)
    escalated = next(f for f in list(turn) if isinstance(f, EscalatedFrame))  # the whole turn, the cloud's call too
    assert isinstance(proxy.chat_requests()[-1].body["messages"][-1]["content"], str)  # sent without it
    assert escalated.message.endswith("; not uploaded, so not seen: photo.png"), escalated.message
    explained = handle.cli("decisions", str(escalated.decision)).stdout
    assert "photo.png (kept on device; no model saw it, as local models read no images)" in explained, explained


def test_a_symlink_named_by_path_is_refused_as_one(walk: Any) -> None:
    """A symlink under `paths.allow_dirs`, pointing at a file beside it, was refused as "outside the allowed
    directories": it is refused because it is a symlink, and now says so."""
    daemon, _, _ = walk
    files = daemon.home / "files"
    (files / "notes.md").write_text("The picnic is on Saturday.\n")
    (files / "latest.md").symlink_to("notes.md")
    with daemon.client() as client, pytest.raises(LocodError) as refused:
        client.ask("When?", attachments=[Attachment("document", "latest.md", path=str(files / "latest.md"))])
    assert refused.value.code == "path_not_allowed" and "'latest.md' is a symlink" in refused.value.message
    assert "outside" not in refused.value.message, refused.value.message


def test_chat_attaches_files_to_its_next_question(walk: Any, tmp_path: Path) -> None:
    """`locod chat` had no way to attach a file: `/attach notes.md` was refused as a command it did not have.
    Now /attach and /private add files (paths as a terminal writes a dropped file, quoted) to the next
    question only; a missing file is said at once and never sent."""
    daemon, proxy, _ = walk
    (tmp_path / "trip notes.md").write_text("The ferry leaves at 7:40 from pier 3.\n")
    (tmp_path / "pin.md").write_text("My bank PIN is 9911.\n")
    typed = (
        f"/attach '{tmp_path / 'trip notes.md'}' {tmp_path / 'missing.md'}\n/private {tmp_path / 'pin.md'}\n"
        "When does the ferry leave?\nAnd from which pier?\n"
    )
    shown = daemon.cli("chat", "--force", "cloud", "--max-tokens", "4", stdin=typed, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert "missing.md: cannot read" in shown.stderr
    assert "pin.md: attached to the next question; it never leaves" in shown.stderr
    first, second = proxy.chat_requests()[-2:]
    assert "ferry leaves at 7:40" in json.dumps(first.body) and "9911" not in json.dumps(first.body)
    assert isinstance(second.body["messages"][-1]["content"], str)  # the next question carries no file
    first_row, second_row = daemon.rows()[-2:]
    assert first_row["session"] == second_row["session"] and second_row["turn"] == first_row["turn"] + 1
    assert "pin.md" in first_row["attachments_offered"] and second_row["attachments_offered"] in (None, "[]")
