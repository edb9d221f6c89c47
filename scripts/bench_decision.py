#!/usr/bin/env python3
"""Per-turn decision cost, with the daemon's own objects: the turn's task category (policy/tasks.py: questions
in four languages, and a paste as long as a prompt may be), the MESS+ step alone (features, predictor, rule),
the full decision (telemetry snapshot, cloud access incl. today's spend from SQLite, candidates and masks,
costs, the ONNX policy, MESS+), and, for a turn that may escalate, the checkpoint's judgement of a 32-token
answer (confidence features, corrected s_hat, the rule); beside the time of one local token in the same
run, and what reading each token's log-prob adds to generation (tokens/s with the reader / without).

    python scripts/bench_decision.py [--turns 3000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from llama_cpp import Llama, LogitsProcessorList

from locod.daemon.attachments import PreparedAttachment
from locod.daemon.cloud import CloudBackend
from locod.daemon.config import CloudModelConfig, load_config
from locod.daemon.decider import Decider
from locod.daemon.decision import Escalation
from locod.daemon.documents import DocChunk
from locod.daemon.fetch import fetch
from locod.daemon.learner import Learner
from locod.daemon.logprobs import TokenLogprobs
from locod.daemon.records import DecisionLog
from locod.daemon.sessions import SessionStore, TurnTrail
from locod.daemon.telemetry import TelemetrySampler
from locod.daemon.turn import Turn
from locod.policy import confidence
from locod.policy.messplus import RecordedFeatures, TurnFeatures, vectorize
from locod.policy.rule import estimate_tokens
from locod.policy.tasks import task_of
from locod.protocol import ChatRequest


class NoLocal:
    """What the decision reads of the local backend, without a model loaded."""

    tokens_per_s = 40.0

    def expected_wait_s(self) -> float:
        return 0.0

    def short_of_memory(self) -> set[str]:
        return set()


# Questions a turn's category is read from, in turn; and a paste as long as a prompt may be (max_prompt_chars).
QUESTIONS = (
    "What does the chart in this photo show about battery life on the train?",
    "Übersetze diesen Absatz über die Akkulaufzeit im Zug ins Englische",
    "这张照片里的图表说明了火车上电池续航的什么情况？",
    "Сколько часов работает батарея в поезде, если она теряет 12 процентов в час",
)
PASTE = "Summarise this:\n" + "The battery lasted four hours on the train, then the charger failed. " * 15_000


@dataclass
class Timings:
    task: list[float]  # the task category of a question
    paste: list[float]  # the task category of a 1 MB paste
    mess: list[float]  # the MESS+ step alone
    full: list[float]  # the whole decision
    judged: list[float]  # the checkpoint's judgement of a 32-token answer


def quantiles(samples: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(samples, n=100)
    return q[49], q[98]


# A 32-token answer as the checkpoint sees it (its pieces and their log-probs).
ANSWER = (
    tuple(f" word{i % 7}" for i in range(32)),
    tuple(-0.05 * (i % 5) - 0.8 * (i % 11 == 0) for i in range(32)),
)


def token_times(llm: Llama, rounds: int = 3) -> tuple[float, float]:
    """Median microseconds per generated token without and with the log-prob reader, alternating rounds."""
    plain, read = [], []
    for _ in range(rounds):
        for samples, processors in ((plain, None), (read, LogitsProcessorList([TokenLogprobs(llm)]))):
            llm.reset()
            started = time.perf_counter()
            out = llm.create_completion(
                "The history of the bicycle", max_tokens=64, temperature=0.0, logits_processor=processors
            )
            tokens = out["usage"]["completion_tokens"]  # type: ignore[index]
            samples.append((time.perf_counter() - started) / tokens * 1e6)
    return statistics.median(plain), statistics.median(read)


def bench_turn(home: str) -> tuple[Decider, Learner, Turn, TurnFeatures]:
    """The daemon's decision objects with a state directory of their own (one cloud model, never
    contacted), and a turn of a three-turn dialogue with two images and a document."""
    config = load_config(env={"LOCOD_STATE_DIR": home}, overrides={"routing.explore_c": "0"})
    mini = CloudModelConfig(name="mini", base_url="http://127.0.0.1:9/v1", model="m")  # never contacted
    config = replace(config, cloud=replace(config.cloud, default="mini", models=[mini]))
    records = DecisionLog(Path(home) / "locod.db")
    cloud = CloudBackend(config.cloud, config.source)
    telemetry = TelemetrySampler(config, cloud, NoLocal())
    telemetry.sample()
    learner = Learner(config, records, cloud)
    decider = Decider(config, learner, records, telemetry, NoLocal(), cloud)  # type: ignore[arg-type]
    sessions = SessionStore(1800, 100)
    session = sessions.open("bench", "ipc")
    for i in range(3):
        trail = TurnTrail("local", (False, False, False), "query")
        sessions.record(session, [{"role": "user", "content": f"earlier question {i}"}], "an answer", trail)
    notes = "battery notes " * 40
    question = "What does the chart in this photo show about battery life on the train?"
    request = ChatRequest("r", [{"role": "user", "content": question}], session="bench")
    attachments = [
        PreparedAttachment("image", "chart.jpg", False, 0.9, 400_000, jpeg=b"x" * 150_000, width=1024, height=768),
        PreparedAttachment("image", "selfie.jpg", True, 0.2, 300_000, jpeg=b"x" * 90_000, width=800, height=600),
        PreparedAttachment(
            "document", "notes.md", False, 0.6, 20_000, chunks=(DocChunk(0, notes, 0.6, estimate_tokens(notes)),)
        ),
    ]
    turn = Turn(request, session, b"client", "query", attachments, config)
    features = TurnFeatures(
        prompt=request.prompt, task="query", n_attachments=3, max_relevance=0.9, has_image=True, position=3
    )
    return decider, learner, turn, features


def time_decisions(turns: int, decider: Decider, learner: Learner, turn: Turn, features: TurnFeatures) -> Timings:
    """Microseconds per call, ``turns`` times each: the task category (of a paste a tenth as often), the MESS+
    step, the full decision, the checkpoint."""
    costs = {"smollm2-135m-instruct": 0.01, "mini": 1.0}
    local = turn.config.local.default
    plan = Escalation(local, "mini|cloud", "mini", (), 0.9, 0.85, 0.5, 32, RecordedFeatures.of(features))
    timings = Timings([], [], [], [], [])
    for i in range(turns):
        started = time.perf_counter()
        task_of(QUESTIONS[i % len(QUESTIONS)])
        timings.task.append((time.perf_counter() - started) * 1e6)
        if i % 10 == 0:  # a paste is rare, and takes longer
            started = time.perf_counter()
            task_of(PASTE)
            timings.paste.append((time.perf_counter() - started) * 1e6)
        started = time.perf_counter()
        x = vectorize(features)
        learner.mess.choose(costs, xs={k: x for k in costs})
        timings.mess.append((time.perf_counter() - started) * 1e6)
        started = time.perf_counter()
        decider.decide(turn)
        timings.full.append((time.perf_counter() - started) * 1e6)
        started = time.perf_counter()
        learner.checkpoint(plan, local, confidence.judged(turn.request.prompt, *ANSWER, plan.tokens))
        timings.judged.append((time.perf_counter() - started) * 1e6)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        decider, learner, turn, features = bench_turn(home)
        timings = time_decisions(args.turns, decider, learner, turn, features)
        policy = decider.policy.version if decider.policy else "none"
    gguf = fetch("smollm2-135m-instruct", Path(__file__).resolve().parent.parent / "models", progress=lambda _: None)
    llm = Llama(model_path=str(gguf), n_ctx=512, verbose=False)
    per_token_us, with_reader = token_times(llm)
    t50, t99 = quantiles(timings.task)
    p50, p99 = quantiles(timings.paste)
    m50, m99 = quantiles(timings.mess)
    f50, f99 = quantiles(timings.full)
    j50, j99 = quantiles(timings.judged)
    print(f"policy: {policy}; {args.turns} turns, 2 local + 1 cloud model x 8 upload choices")
    print("| measure | p50 | p99 |\n|---|---|---|")
    print(f"| task category of a question (4 languages) | {t50:.1f} us | {t99:.1f} us |")
    print(f"| task category of a {len(PASTE) / 1e6:.0f} MB paste | {p50:.0f} us | {p99:.0f} us |")
    print(f"| MESS+ step: features + predictor + rule (goal p99 < 100 us) | {m50:.1f} us | {m99:.1f} us |")
    print(
        f"| full decision: snapshot, access, masks, costs, ONNX policy, MESS+ (goal p99 < 500 us) | "
        f"{f50:.1f} us | {f99:.1f} us |"
    )
    print(f"| checkpoint of a 32-token answer: features + corrected s_hat + rule | {j50:.1f} us | {j99:.1f} us |")
    print(f"| one local token (SmolLM2-135M, same run) | {per_token_us:.0f} us | |")
    print(f"| one local token, reading its log-prob (same run) | {with_reader:.0f} us | |")
    print(f"| full decision p99 / one local token | {f99 / per_token_us:.3f} | |")


if __name__ == "__main__":
    main()
