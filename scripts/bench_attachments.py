#!/usr/bin/env python3
"""Attachment preparation cost beside the cloud time it saves.

Times, with the daemon's own code (locod.daemon.attachments):
- a 12-megapixel JPEG photo: header check, reduced decode, resize to 1024 px, JPEG under 300 kB;
- a 50-page text document (~150,000 characters): chunking, term extraction and relevance ranking;
and compares them, in the same run, with uploading the original bytes at the telemetry's prior bandwidth
(2 MB/s) and with TMO's published cloud latency for one image over WiFi (1.9 s).

    python scripts/bench_attachments.py [--repeat 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import cv2
import numpy as np

from locod.daemon.attachments import prepare, terms
from locod.daemon.config import AttachmentsConfig, TelemetryConfig
from locod.protocol import Attachment

TMO_WIFI_ONE_IMAGE_S = 1.9


def photo() -> bytes:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)
    pixels = cv2.GaussianBlur(cv2.resize(small, (4000, 3000), interpolation=cv2.INTER_CUBIC), (5, 5), 0)
    ok, buf = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 92])
    assert ok
    return bytes(buf)


def document() -> bytes:
    rng = np.random.default_rng(1)
    words = [
        "battery",
        "network",
        "latency",
        "cloud",
        "device",
        "model",
        "answer",
        "energy",
        "budget",
        "policy",
        "queue",
        "thermal",
        "memory",
        "token",
        "session",
        "image",
        "document",
        "relevance",
        "upload",
        "schedule",
        "warranty",
        "invoice",
        "contract",
        "clause",
    ]
    pages = []
    for page in range(50):
        paragraphs = [" ".join(rng.choice(words, 60)) + "." for _ in range(5)]
        pages.append(f"Page {page + 1}\n\n" + "\n\n".join(paragraphs))
    return "\n\n".join(pages).encode()


def timed(fn, repeat: int) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        out.append((time.perf_counter() - started) * 1e3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    config = AttachmentsConfig()
    prior_bps = TelemetryConfig().bandwidth_prior_bps
    jpeg, text = photo(), document()
    prompt_terms = terms("What does the warranty clause say about the battery?")
    image = Attachment("image", "photo.jpg", jpeg)
    doc = Attachment("document", "manual.txt", text)
    prepared = prepare(image, jpeg, prompt_terms, config)
    image_ms = timed(lambda: prepare(image, jpeg, prompt_terms, config), args.repeat)
    doc_ms = timed(lambda: prepare(doc, text, prompt_terms, config), args.repeat)
    chunks = prepare(doc, text, prompt_terms, config).chunks
    upload_original_s = len(jpeg) / prior_bps
    upload_prepared_s = len(prepared.jpeg) / prior_bps
    med = statistics.median
    print("| measure | value |\n|---|---|")
    print(
        f"| 12 MP photo ({len(jpeg) / 1e6:.1f} MB JPEG) -> {prepared.width}x{prepared.height}, "
        f"{len(prepared.jpeg) / 1e3:.0f} kB | median {med(image_ms):.1f} ms, max {max(image_ms):.1f} ms |"
    )
    print(
        f"| upload time saved at the 2 MB/s prior | {upload_original_s - upload_prepared_s:.2f} s "
        f"({upload_original_s:.2f} s -> {upload_prepared_s:.2f} s) |"
    )
    print(
        f"| preparation / TMO's 1-image WiFi cloud latency ({TMO_WIFI_ONE_IMAGE_S} s) | "
        f"{med(image_ms) / 1e3 / TMO_WIFI_ONE_IMAGE_S:.3f} |"
    )
    print(
        f"| 50-page document ({len(text) / 1e3:.0f} kB, {len(chunks)} chunks): chunk + rank | "
        f"median {med(doc_ms):.2f} ms ({med(doc_ms) * 1e3 / len(chunks):.0f} us per chunk) |"
    )


if __name__ == "__main__":
    main()
