#!/usr/bin/env python3
"""Build the routing replay trace (docs/routing.md) from BIG-bench tasks with gold answers.

Every local label comes from really running the embedded model (greedy) on the prompt and grading its
answer against the gold targets; the trace keeps the answer's per-token log-probabilities (`tokens`,
`logprobs`) and the GGUF's SHA-256, so a replay can judge the model's confidence in its own answer. No
cloud endpoint is reachable here, so the cloud label is simulated at a stated accuracy per task
(Task.cloud_accuracy, seeded), and the metadata file says so. Latency, money and energy follow the stated
cost model below.

    python scripts/build_trace.py [--tasks bigbench|unseen] [--out TRACE] [--limit N]
    python scripts/build_trace.py --rerun-local policy/data/bigbench_trace.jsonl [--threads 1]

--rerun-local keeps a trace's prompts and cloud labels and runs the local model again (a new GGUF or
llama.cpp, or log-probs added to an older trace). On a machine shared with other work, run with
OMP_WAIT_POLICY=PASSIVE: llama.cpp's OpenMP threads otherwise spin while waiting for a core, ten times
the CPU time per answer here.

--tasks picks the task set: `bigbench`, the shipped trace the warm-start prior is fitted on, or `unseen`,
other tasks that neither the prior nor any tuning has seen (policy/data/bigbench_unseen_trace.jsonl).

Inputs: the `bigbench==1.0.0` sdist from PyPI (downloaded by its index URL and SHA-256, never installed;
task JSON files read straight out of the tarball) and the embedded GGUF (models/manifest.toml).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from llama_cpp import Llama

from locod.daemon.fetch import fetch

REPO = Path(__file__).resolve().parent.parent
LOCAL_NAME = "smollm2-135m-instruct"
SEED = 20251125
# pip cannot download this sdist any more (its metadata names a file:// dependency, which pip refuses).
SDIST_URL = (
    "https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/"
    "bigbench-1.0.0.tar.gz"
)
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"


@dataclass(frozen=True)
class Task:
    """One BIG-bench task as the trace asks it: where its examples are in the sdist, how many to take,
    the prompt around each input, the answer's token limit, locod's category of it, and the simulated
    cloud model's accuracy on it (stated, not measured: a strong hosted model on these short tasks)."""

    path: str
    count: int
    template: str
    max_tokens: int
    category: str
    cloud_accuracy: float
    numeric: bool = False  # graded by the last number the answer states


NUMBER_ONLY = "{input} Answer with the number only."
ONE_WORD = "{input} Answer with one word."
# The shipped trace's tasks (policy/data/bigbench_trace.jsonl): the warm-start prior is fitted on them.
BIGBENCH = {
    "add_1digit": Task("arithmetic/1_digit_addition", 100, NUMBER_ONLY, 24, "math", 0.99, numeric=True),
    "add_2digit": Task("arithmetic/2_digit_addition", 250, NUMBER_ONLY, 24, "math", 0.97, numeric=True),
    "mul_2digit": Task("arithmetic/2_digit_multiplication", 250, NUMBER_ONLY, 24, "math", 0.90, numeric=True),
    "wikidata": Task("qa_wikidata", 500, "Complete the sentence with a short answer: {input}", 24, "query", 0.80),
    "plural": Task(
        "linguistic_mappings/plural_json",
        300,
        'What is the plural of the word "{input}"? Answer with one word.',
        24,
        "rewrite",
        0.97,
    ),
    "past_tense": Task(
        "linguistic_mappings/past_tense_json",
        300,
        'What is the past tense of the verb "{input}"? Answer with one word.',
        24,
        "rewrite",
        0.97,
    ),
    "negation": Task(
        "linguistic_mappings/sentence_negation_json",
        300,
        'Rewrite this sentence as its negation: "{input}"',
        32,
        "rewrite",
        0.93,
    ),
}
# Tasks neither the prior nor any tuning has seen (policy/data/bigbench_unseen_trace.jsonl): a check that
# the router does not only work on the trace it was developed on.
UNSEEN = {
    "sub_1digit": Task("arithmetic/1_digit_subtraction", 100, NUMBER_ONLY, 24, "math", 0.99, numeric=True),
    "add_3digit": Task("arithmetic/3_digit_addition", 200, NUMBER_ONLY, 24, "math", 0.95, numeric=True),
    "counting": Task("object_counting", 200, NUMBER_ONLY, 24, "math", 0.90, numeric=True),
    "elements": Task("periodic_elements/subtask_1", 200, ONE_WORD, 24, "query", 0.90),
    "categories": Task("auto_categorization", 200, "Complete with a short answer: {input}", 24, "chat", 0.75),
    "unscramble": Task("word_unscrambling", 200, "{input}____. Answer with the word only.", 24, "chat", 0.90),
    "qasc": Task(
        "natural_instructions/subtask041_qasc_answer_generation",
        200,
        "{input}\nAnswer with a short phrase from the fact.",
        32,
        "query",
        0.90,
    ),
}
TASK_SETS = {"bigbench": BIGBENCH, "unseen": UNSEEN}

# Cost model. Cloud: TMO's WiFi latency without uploads (0.5 s) plus 60 tokens/s of output; gpt-4o-mini
# class prices. Local: the measured wall time at an assumed 15 W device draw (TMO's Jetson TX2 figure).
CLOUD_BASE_S, CLOUD_TOKENS_PER_S = 0.5, 60.0
USD_PER_MTOK_IN, USD_PER_MTOK_OUT = 0.15, 0.60
LOCAL_WATTS, RADIO_J = 15.0, 0.2


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


NUMBER_WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
]


def correct(task: Task, answer: str, targets: list[str]) -> bool:
    """Lenient grading for a chatty small model: numbers by the last one it states ("4 + 1 = 5", "... three
    instruments"), words
    and sentences by the gold target appearing as whole words anywhere in the answer."""
    if task.numeric:
        words = re.findall(r"-?\d+|[a-z]+", answer.lower().replace(",", ""))
        numbers = [
            w if w[-1].isdigit() else str(NUMBER_WORDS.index(w)) for w in words if w[-1].isdigit() or w in NUMBER_WORDS
        ]
        return bool(numbers) and numbers[-1] in targets
    said = f" {normalise(answer)} "
    return any(f" {normalise(t)} " in said for t in targets if normalise(t))


def answer(llm: Llama, prompt: str, max_tokens: int) -> tuple[str, dict[str, object], float, int, int]:
    """The local model's greedy answer, its trace fields (tokens and their log-probabilities), the wall time
    and the prompt and answer token counts."""
    t0 = time.perf_counter()
    reply = llm.create_chat_completion(
        messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0.0, seed=SEED
    )
    local_s = time.perf_counter() - t0
    text = str(reply["choices"][0]["message"]["content"] or "")  # type: ignore[index]
    usage = reply["usage"]  # type: ignore[index]
    n_prompt, n_answer = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
    tokens, logprobs = greedy_logprobs(llm, n_prompt, n_answer)
    fields = {"answer": text[:200], "tokens": tokens, "logprobs": logprobs}
    return text, fields, local_s, n_prompt, max(n_answer, 1)


def greedy_logprobs(llm: Llama, n_prompt: int, n_answer: int) -> tuple[list[str], list[float]]:
    """Each answer token and its log-probability, from the logits the model kept (logits_all): greedy
    decoding chose the most likely token at every step, so the token is the row's argmax. The same figures
    llama-cpp-python returns with logprobs=True, without its Python sort of the vocabulary per token."""
    rows = np.asarray(llm.scores[n_prompt - 1 : n_prompt - 1 + n_answer], dtype=np.float64)
    top = rows.max(axis=1)
    logprobs = -np.log(np.exp(rows - top[:, None]).sum(axis=1))
    ids = rows.argmax(axis=1).tolist()
    tokens = [llm.detokenize([i]).decode("utf-8", errors="ignore") for i in ids]
    return tokens, [round(float(lp), 4) for lp in logprobs]


def local_fields(  # type: ignore[no-untyped-def]
    task: Task, targets: list[str], text: str, fields: dict[str, object], local_s: float, sha: str, max_tokens: int
):
    """The trace's fields for the local model's answer: the label, costs, tokens and log-probs."""
    ok = correct(task, text, targets)
    return {
        "satisfied": int(ok),
        "quality": float(ok),
        "latency_s": round(local_s, 4),
        "usd": 0.0,
        "energy_j": round(local_s * LOCAL_WATTS, 3),
        **fields,
        "max_tokens": max_tokens,
        "gguf_sha256": sha,
    }


def sdist_tasks(cache: Path) -> tarfile.TarFile:
    """The sdist, from the cache or downloaded once, checked against its published SHA-256."""
    archive = cache / "bigbench-1.0.0.tar.gz"
    if not archive.exists():
        partial = archive.with_suffix(".partial")
        with urllib.request.urlopen(SDIST_URL, timeout=60) as reply, partial.open("wb") as f:
            while chunk := reply.read(1 << 20):
                f.write(chunk)
        partial.replace(archive)
    digest = hashlib.sha256()
    with archive.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != SDIST_SHA256:
        sys.exit(f"{archive}: SHA-256 {digest.hexdigest()}, expected {SDIST_SHA256}; delete it and run again")
    return tarfile.open(archive)


def examples(archive: tarfile.TarFile, path: str) -> list[dict[str, object]]:
    member = archive.extractfile(f"bigbench-1.0.0/bigbench/benchmark_tasks/{path}/task.json")
    assert member is not None
    return list(json.load(member)["examples"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", choices=sorted(TASK_SETS), default="bigbench")
    parser.add_argument("--out", help="default: policy/data/bigbench_trace.jsonl, or bigbench_unseen_trace.jsonl")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "locod-bigbench"))
    parser.add_argument("--limit", type=int, default=0, help="cap examples per task (for a quick run)")
    parser.add_argument("--rerun-local", metavar="TRACE", help="rerun the local model over TRACE's prompts")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    gguf = fetch("smollm2-135m-instruct", REPO / "models", progress=lambda _: None)
    sha, size = hashlib.sha256(gguf.read_bytes()).hexdigest(), gguf.stat().st_size
    llm = Llama(
        model_path=str(gguf),
        n_ctx=512,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        logits_all=True,
        verbose=False,
    )
    tasks = TASK_SETS[args.tasks]
    name = "bigbench_trace.jsonl" if args.tasks == "bigbench" else f"bigbench_{args.tasks}_trace.jsonl"
    out = Path(args.out or REPO / "policy/data" / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.rerun_local:
        rerun_local(llm, (sha, size), tasks, Path(args.rerun_local), out)
        return
    rng = random.Random(SEED)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    turns = []
    with sdist_tasks(cache) as archive:
        for name, task in tasks.items():
            pool = examples(archive, task.path)
            chosen = rng.sample(pool, min(args.limit or task.count, task.count, len(pool)))
            for example in chosen:
                target = example["target"]
                targets = [str(t) for t in (target if isinstance(target, list) else [target])]
                turns.append((name, task.template.format(input=example["input"]), targets))
    rng.shuffle(turns)
    accuracy: dict[str, list[int]] = {t: [] for t in tasks}
    dialogue, position, length = 0, 0, rng.randint(2, 5)
    started = time.time()
    with out.open("w") as f:
        for n, (name, prompt, targets) in enumerate(turns):
            task = tasks[name]
            text, fields, local_s, tokens_in, tokens_out = answer(llm, prompt, task.max_tokens)
            local = local_fields(task, targets, text, fields, local_s, sha, task.max_tokens)
            accuracy[name].append(local["satisfied"])
            cloud_ok = rng.random() < task.cloud_accuracy
            row = {
                "dialogue": f"d{dialogue:04d}",
                "turn": position,
                "task": name,
                "category": task.category,
                "prompt": prompt,
                "gold": targets,
                "attachments": [],
                "models": {
                    LOCAL_NAME: local,
                    "cloud": {
                        "satisfied": int(cloud_ok),
                        "quality": float(cloud_ok),
                        "latency_s": round(CLOUD_BASE_S + tokens_out / CLOUD_TOKENS_PER_S, 4),
                        "usd": round((tokens_in * USD_PER_MTOK_IN + tokens_out * USD_PER_MTOK_OUT) / 1e6, 9),
                        "energy_j": RADIO_J,
                    },
                },
            }
            f.write(json.dumps(row) + "\n")
            position += 1
            if position == length:
                dialogue, position, length = dialogue + 1, 0, rng.randint(2, 5)
            progress(n, len(turns), started)
    write_meta(out, tasks, accuracy, (sha, size))


def rerun_local(llm: Llama, gguf: tuple[str, int], tasks: dict[str, Task], source: Path, out: Path) -> None:
    """Run the local model again over a trace's prompts, keeping everything else (the cloud labels too).
    Where the answer is the one the trace holds, so is its wall time: the same computation, timed when the
    trace was built, on a machine this rerun may share."""
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    accuracy: dict[str, list[int]] = {t: [] for t in tasks}
    changed, started = 0, time.time()
    for n, row in enumerate(rows):
        task = tasks[row["task"]]
        text, fields, local_s, _, _ = answer(llm, row["prompt"], task.max_tokens)
        old = row["models"][LOCAL_NAME]
        local = local_fields(task, row["gold"], text, fields, local_s, gguf[0], task.max_tokens)
        if fields["answer"] == old["answer"]:
            local["latency_s"], local["energy_j"] = old["latency_s"], old["energy_j"]
        else:
            changed += 1
        row["models"][LOCAL_NAME] = local
        accuracy[row["task"]].append(local["satisfied"])
        progress(n, len(rows), started)
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"{changed} local answers differ from {source.name}'s", file=sys.stderr)
    write_meta(out, tasks, accuracy, gguf)


def progress(n: int, total: int, started: float) -> None:
    if n % 100 == 0:
        print(f"{n}/{total} turns, {time.time() - started:.0f} s", file=sys.stderr, flush=True)


def write_meta(out: Path, tasks: dict[str, Task], accuracy: dict[str, list[int]], gguf: tuple[str, int]) -> None:
    meta = {
        "format": "locod replay trace v1 (docs/routing.md)",
        "source": "bigbench==1.0.0 sdist from PyPI",
        "tasks": {name: task.path for name, task in tasks.items()},
        "seed": SEED,
        "turns": sum(len(v) for v in accuracy.values()),
        "local_model": "smollm2-135m-instruct (Q4_1, greedy, really run; per-token log-probs kept)",
        "local_gguf_sha256": {LOCAL_NAME: gguf[0]},
        "local_gguf_size": {LOCAL_NAME: gguf[1]},
        "local_accuracy": {t: round(sum(v) / len(v), 4) for t, v in accuracy.items() if v},
        "cloud_label": "simulated, not measured: Bernoulli per turn at the stated accuracy per task",
        "cloud_accuracy": {name: task.cloud_accuracy for name, task in tasks.items()},
        "cost_model": {
            "cloud_latency_s": f"{CLOUD_BASE_S} + out_tokens / {CLOUD_TOKENS_PER_S}",
            "cloud_usd_per_mtok": [USD_PER_MTOK_IN, USD_PER_MTOK_OUT],
            "local_watts": LOCAL_WATTS,
            "cloud_radio_j": RADIO_J,
        },
        "dialogues": "consecutive shuffled turns grouped into dialogues of 2-5 turns (synthetic grouping)",
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
    }
    out.with_suffix(".meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta["local_accuracy"]), file=sys.stderr)


if __name__ == "__main__":
    main()
