"""Review 18: this session's attachments, dialogue cache and routing changes read as their maintainer."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from locod.daemon.backends import Prompt
from locod.daemon.config import EMBEDDED_MODEL, LocalConfig
from locod.daemon.kvpark import DiskPark
from locod.daemon.local import LocalBackend, ModelZoo

MODEL = EMBEDDED_MODEL.name
# About 200 tokens: a dialogue's state is then about 5 MB, so 8 MB of memory, or of disk, holds one.
LONG = "Here is some background you may need later. " * 20


def zoo_of(models_dir: Path, cache_mb: int, park: DiskPark | None = None) -> ModelZoo:
    """The real embedded model in a zoo keeping up to ``cache_mb`` of dialogue states."""
    return ModelZoo([dataclasses.replace(EMBEDDED_MODEL, n_ctx=2048)], models_dir, 4096, 0, cache_mb, park)


@pytest.fixture
def backend(models_dir: Path) -> Iterator[LocalBackend]:
    zoo = zoo_of(models_dir, 64)
    yield LocalBackend(zoo)
    zoo.close()


def ask(backend: LocalBackend, session: str, text: str) -> None:
    prompt = Prompt([{"role": "user", "content": text}], 4, 0.0, 1, lambda _: None, session=session)
    backend.generate(MODEL, backend.fit(MODEL, prompt))


def test_a_reload_to_cache_mb_0_restores_no_kept_state_at_the_next_turn(backend: LocalBackend) -> None:
    """begin_turn took the incoming dialogue's state out of the cache before it brought the cache within
    cache_mb: after a reload to 0 the first turn of a kept dialogue was still restored from memory, a hit of
    a cache that was off (docs/configuration.md: the states over it are evicted at the next local turn)."""
    zoo = backend.zoo
    ask(backend, "A", "Tell me about cats.")
    ask(backend, "B", "Tell me about rivers.")
    assert zoo.cache.status()["dialogues"] == 1  # A's state, kept while B holds the model
    zoo.reconfigure(LocalConfig(cache_mb=0, models=list(zoo.models.values())))
    ask(backend, "A", "And about dogs?")
    status = zoo.cache.status()
    assert status["hits"] == 0 and status["misses"] == 3
    assert status["dialogues"] == 0 and status["mb"] == 0


def test_a_parked_state_is_taken_before_the_outgoing_one_is_parked(models_dir: Path, tmp_path: Path) -> None:
    """A dialogue parked on disk was looked for only after the outgoing dialogue's state entered the cache,
    whose eviction parked another state; a full park then deleted its oldest file, the very one about to be
    resumed. Three dialogues taking turns with room for one state in memory and one on disk resumed one
    turn in two from scratch; the parked state now leaves the park first, as the kept one leaves memory."""
    park = DiskPark(tmp_path / "kv", 8 << 20)
    zoo = zoo_of(models_dir, 8, park)
    try:
        backend = LocalBackend(zoo)
        for session in "ABC":  # C's turn keeps B's state in memory and parks A's
            ask(backend, session, f"{LONG}Tell me about {session}.")
        assert park.usage()[0] == 1 and zoo.cache.status()["dialogues"] == 1
        ask(backend, "A", f"{LONG}Tell me about A.")
        status = zoo.cache.status()
        assert status["disk_hits"] == 1 and status["misses"] == 3
    finally:
        zoo.close()


def test_an_older_policy_whose_feature_names_are_no_list_is_refused_not_a_crash(tmp_path: Path) -> None:
    """A file of an older layout whose locod.feature_names is JSON but no list (``5``) raised TypeError
    out of OnnxPolicy, which the daemon catches only as PolicyError: its start failed instead of routing
    with MESS+ alone. Both readings of the names (this layout's check, an older layout's) now share one."""
    import onnx

    from locod.errors import PolicyError
    from locod.policy.observation import LAYOUT_VERSION
    from locod.policy.onnx_policy import DEFAULT_POLICY, OnnxPolicy

    model = onnx.load(str(DEFAULT_POLICY))
    for entry in model.metadata_props:
        if entry.key == "locod.layout_version":
            entry.value = str(LAYOUT_VERSION - 1)
        if entry.key == "locod.feature_names":
            entry.value = "5"
    onnx.save(model, str(tmp_path / "older.onnx"))
    with pytest.raises(PolicyError) as info:
        OnnxPolicy(tmp_path / "older.onnx")
    assert info.value.code == "policy_mismatch"


def test_a_utf16_file_with_an_odd_byte_is_refused_as_utf16_not_as_not_utf8(tmp_path: Path) -> None:
    """A Windows "Unicode" file a Unix tool appended a newline to (``echo >> notes.txt``) holds an odd byte
    after its UTF-16 text: refused, rightly, but as "not UTF-8 text", to a user whose file says UTF-16 in
    its first two bytes; the refusal now says what the file is."""
    from locod.daemon import attachments as att
    from locod.daemon.config import AttachmentsConfig
    from locod.errors import AttachmentError
    from locod.protocol import Attachment

    path = tmp_path / "notes.txt"
    path.write_bytes("Meeting notes: the budget is 4200 euros.\r\n".encode("utf-16") + b"\n")
    data = path.read_bytes()
    with pytest.raises(AttachmentError, match="UTF-16 text, by its byte-order mark, that does not decode") as info:
        att.prepare(Attachment("document", path.name, data=data), data, att.terms("budget"), AttachmentsConfig())
    assert info.value.code == "bad_document" and "odd number of bytes" in info.value.message
    assert "not UTF-8" not in info.value.message


@pytest.mark.parametrize(("ext", "keep"), [(".webp", 20), (".png", 12)])
def test_a_readable_format_with_a_broken_header_is_not_told_it_is_unsupported(
    tmp_path: Path, ext: str, keep: int
) -> None:
    """A WebP cut before its frame header was refused as "not a supported image (PNG, JPEG, WebP or BMP)":
    the list named the very format it is. The refusal now says its header is cut short or unreadable."""
    import cv2
    import numpy as np

    from locod.daemon import attachments as att
    from locod.daemon.config import AttachmentsConfig
    from locod.errors import AttachmentError
    from locod.protocol import Attachment

    _, encoded = cv2.imencode(ext, np.full((32, 32, 3), 128, np.uint8))
    path = tmp_path / f"photo{ext}"
    path.write_bytes(bytes(encoded)[:keep])  # a download cut short
    data = path.read_bytes()
    fmt = "WebP" if ext == ".webp" else "PNG"
    with pytest.raises(AttachmentError, match=f"its {fmt} header is cut short or unreadable") as info:
        att.prepare(Attachment("image", path.name, data=data), data, set(), AttachmentsConfig())
    assert info.value.code == "bad_image" and "not a supported image" not in info.value.message
