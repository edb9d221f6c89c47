#!/usr/bin/env python3
"""Build a routing replay trace (docs/routing.md) from BIG-bench tasks, or your own questions, with gold answers.

Every local label comes from really running a local model (the embedded one, or any GGUF with --model;
greedy) on the prompt and grading its
answer against the gold targets; the trace keeps the answer's per-token log-probabilities (`tokens`,
`logprobs`) and the GGUF's SHA-256, so a replay can judge the model's confidence in its own answer. No
cloud endpoint is reachable here, so the cloud label is simulated at a stated accuracy per task
(Task.cloud_accuracy, seeded), and the metadata file says so. Latency, money and energy follow the stated
cost model below.

    python scripts/build_trace.py [--tasks bigbench|unseen] [--out TRACE] [--limit N]
    python scripts/build_trace.py --rerun-local policy/data/bigbench_trace.jsonl [--threads 1]
    python scripts/build_trace.py --questions mine.jsonl --model ~/models/llama-3.2-3b.Q4_K_M.gguf --out t.jsonl

--questions reads your own question set instead of BIG-bench, one JSON object a line:
`{"task": "...", "prompt": "...", "gold": ["accepted answer", ...]}`, optionally with `"numeric": true`
(graded by the last number the answer states), `"max_tokens"` (default 32) and `"cloud_accuracy"` (the
simulated cloud model's accuracy on that task, default 0.9; the three are the task's, from its first line:
a line may restate them, not change them). Every line is checked before the model runs, and a bad one is
named by its line number; answers are graded ignoring case, accents and punctuation, in any script. The
model answers with a 512-token context, or one sized to the longest prompt (up to the GGUF's trained
context, at most 4096 tokens).
--model answers with any GGUF; the trace then holds that model's labels under --name (default: the file's
name), and scripts/replay.py and scripts/fit_prior.py read whichever one local model a trace holds.

--rerun-local keeps a trace's prompts and cloud labels and runs the local model again (a new GGUF or
llama.cpp, or log-probs added to an older trace); a trace of your own questions needs --questions FILE
beside it, for its tasks' grading. On a machine shared with other work, run with
OMP_WAIT_POLICY=PASSIVE: llama.cpp's OpenMP threads otherwise spin while waiting for a core, ten times
the CPU time per answer here.

--tasks picks the task set: `bigbench`, the shipped trace the warm-start prior is fitted on, or `unseen`,
other tasks that neither the prior nor any tuning has seen (policy/data/bigbench_unseen_trace.jsonl).

Inputs: the `bigbench==1.0.0` sdist from PyPI (downloaded by its index URL and SHA-256, never installed;
task JSON files read straight out of the tarball), or --questions; the embedded GGUF (models/manifest.toml)
or --model.
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
import unicodedata
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from llama_cpp import Llama

from locod.daemon.fetch import fetch
from locod.daemon.gguf import NotGGUF, describe
from locod.daemon.pull import MAX_DEFAULT_CTX
from locod.errors import PolicyError
from locod.policy.tasks import task_of
from locod.policy.trace import local_model, read_rows

REPO = Path(__file__).resolve().parent.parent
EMBEDDED = "smollm2-135m-instruct"
SEED = 20251125
# pip cannot download this sdist any more (its metadata names a file:// dependency, which pip refuses).
SDIST_URL = (
    "https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/"
    "bigbench-1.0.0.tar.gz"
)
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"


@dataclass(frozen=True)
class Task:
    """One task as the trace asks it: where its examples are (a BIG-bench task in the sdist, or a question
    file's task), how many to take (BIG-bench's), the prompt around each input, the answer's token limit,
    locod's category of it, and the simulated cloud model's accuracy on it (stated, not measured: a strong
    hosted model on these short tasks)."""

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
    """Lower case, accents dropped, every run of what is not a letter or digit one space: "Brasília" and
    "brasilia" match, and answers in any script keep their letters."""
    folded = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return " ".join(re.sub(r"[\W_]", " ", folded.casefold()).split())


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
    parser.add_argument(
        "--tasks", choices=sorted(TASK_SETS), default="bigbench", help="BIG-bench task set (without --questions)"
    )
    parser.add_argument("--questions", metavar="JSONL", help="your own question set instead of BIG-bench's tasks")
    parser.add_argument("--model", metavar="GGUF", help="the local model (default: the embedded one)")
    parser.add_argument("--name", help="the local model's name in the trace (default: the GGUF file's name)")
    parser.add_argument(
        "--out",
        help="the trace to write (needed with --questions, --limit or --model; default: the shipped trace of --tasks, "
        "policy/data/bigbench_trace.jsonl or bigbench_unseen_trace.jsonl)",
    )
    parser.add_argument(
        "--cache",
        default=str(Path(tempfile.gettempdir()) / "locod-bigbench"),
        help="where the BIG-bench sdist is kept between runs (default: %(default)s)",
    )
    parser.add_argument("--limit", type=int, default=0, help="at most this many questions per task (0: all)")
    parser.add_argument("--rerun-local", metavar="TRACE", help="rerun the local model over TRACE's prompts")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default: 2)")
    args = parser.parse_args()
    if args.limit < 0:
        parser.error(f"--limit {args.limit}: a number of questions per task, at least 1 (0 takes them all)")
    if args.questions and not args.out:
        parser.error("--questions needs --out (the shipped traces are BIG-bench's)")
    if not args.out and (args.limit or args.model):
        parser.error("--limit and --model make a trace other than the shipped one: name it with --out")
    if args.questions and Path(args.out).resolve() == Path(args.questions).resolve():
        parser.error("--out names the question file itself: the trace would replace your questions")
    rng = random.Random(SEED)
    if args.questions:
        questions = Path(args.questions)
        tasks, turns, where = read_questions(questions, args.limit, rng)
        source = f"{questions.name} (sha256 {hashlib.sha256(questions.read_bytes()).hexdigest()[:12]})"
    else:
        tasks = TASK_SETS[args.tasks]
        turns = [] if args.rerun_local else bigbench_turns(tasks, Path(args.cache), args.limit, rng)
        source = "bigbench==1.0.0 sdist from PyPI"
    model = LocalModel.open(args.model, args.name, args.threads)
    if args.questions:
        model.fit_context([(where[prompt], prompt, tasks[task].max_tokens) for task, prompt, _ in turns])
    name = "bigbench_trace.jsonl" if args.tasks == "bigbench" else f"bigbench_{args.tasks}_trace.jsonl"
    out = Path(args.out or REPO / "policy/data" / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.rerun_local:
        rerun_local(model, tasks, Path(args.rerun_local), out, source)
        return
    accuracy = write_trace(model, tasks, turns, out, rng)
    write_meta(out, tasks, accuracy, model, source)


def write_trace(
    model: LocalModel, tasks: dict[str, Task], turns: Turns, out: Path, rng: random.Random
) -> dict[str, list[int]]:
    """The local model's answer to each turn, with the simulated cloud's, one JSON line each, grouped into
    dialogues of 2-5 turns; returns each task's local labels."""
    accuracy: dict[str, list[int]] = {t: [] for t in tasks}
    dialogue, position, length = 0, 0, rng.randint(2, 5)
    started = time.time()
    with out.open("w") as f:
        for n, (task_name, prompt, targets) in enumerate(turns):
            task = tasks[task_name]
            text, fields, local_s, tokens_in, tokens_out = answer(model.llm, prompt, task.max_tokens)
            local = local_fields(task, targets, text, fields, local_s, model.sha256, task.max_tokens)
            accuracy[task_name].append(local["satisfied"])
            cloud = cloud_fields(rng.random() < task.cloud_accuracy, tokens_in, tokens_out)
            row = {
                "dialogue": f"d{dialogue:04d}",
                "turn": position,
                "task": task_name,
                "category": task.category,
                "prompt": prompt,
                "gold": targets,
                "attachments": [],
                "models": {model.name: local, "cloud": cloud},
            }
            f.write(json.dumps(row) + "\n")
            position += 1
            if position == length:
                dialogue, position, length = dialogue + 1, 0, rng.randint(2, 5)
            progress(n, len(turns), started)
    return accuracy


def cloud_fields(ok: bool, tokens_in: int, tokens_out: int) -> dict[str, object]:
    """The simulated cloud model's row: right with its task's accuracy, priced and timed by the tokens."""
    return {
        "satisfied": int(ok),
        "quality": float(ok),
        "latency_s": round(CLOUD_BASE_S + tokens_out / CLOUD_TOKENS_PER_S, 4),
        "usd": round((tokens_in * USD_PER_MTOK_IN + tokens_out * USD_PER_MTOK_OUT) / 1e6, 9),
        "energy_j": RADIO_J,
    }


CONTEXT = 512  # the answering context unless a prompt needs more (logits_all keeps n_ctx x n_vocab floats)
TEMPLATE_TOKENS = 64  # a margin for what a chat template adds around a prompt


@dataclass
class LocalModel:
    """The GGUF that answers: its name in the trace, its SHA-256 and size (the shipped prior's key), and
    llama.cpp with every position's logits kept (the answer's log-probs)."""

    name: str
    sha256: str
    size: int
    llm: Llama
    gguf: Path
    threads: int

    @classmethod
    def open(cls, path: str | None, name: str | None, threads: int) -> LocalModel:
        if path is None:
            gguf, default_name = fetch(EMBEDDED, REPO / "models", progress=lambda _: None), EMBEDDED
        else:
            gguf = Path(path).expanduser()
            default_name = gguf.name.removesuffix(".gguf").lower()
            try:
                describe(gguf)
            except OSError as exc:
                sys.exit(f"--model {path}: cannot read it ({exc.strerror}); give the path of a GGUF model file")
            except NotGGUF as exc:
                sys.exit(f"--model {path}: {exc}; give the path of a GGUF model file")
        digest = hashlib.sha256()
        with gguf.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        llm = load(gguf, CONTEXT, threads)
        return cls(name or default_name, digest.hexdigest(), gguf.stat().st_size, llm, gguf, threads)

    def fit_context(self, asked: list[tuple[str, str, int]]) -> None:
        """Make room for the longest (where, prompt, max_tokens) asked, before any answer is made: a context
        from 512 tokens up to the GGUF's trained one, at most what `locod pull` gives a model; a question no
        such context holds is named, rather than failing the build when its turn comes."""
        needs = sorted(
            ((len(self.llm.tokenize(p.encode(), add_bos=False)) + TEMPLATE_TOKENS + m, w) for w, p, m in asked),
            reverse=True,
        )
        need, longest = needs[0]
        if need <= self.llm.n_ctx():
            return
        most = min(describe(self.gguf).context_length or MAX_DEFAULT_CTX, MAX_DEFAULT_CTX)
        over = [w for n, w in needs if n > most]
        if over:
            others = f" (and {len(over) - 1} more)" if len(over) > 1 else ""
            sys.exit(
                f"{longest}{others}: the prompt and its answer need about {need} tokens, more than the {most} this "
                f"model answers with (its trained context, at most {MAX_DEFAULT_CTX}); shorten it or lower max_tokens"
            )
        n_ctx = min(-(-need // 256) * 256, most)
        print(f"answering with a {n_ctx}-token context for the longest prompt ({longest})", file=sys.stderr)
        self.llm = load(self.gguf, n_ctx, self.threads)


def load(gguf: Path, n_ctx: int, threads: int) -> Llama:
    return Llama(
        model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, logits_all=True, verbose=False
    )


Turns = list[tuple[str, str, list[str]]]  # (task, prompt, accepted answers)


def bigbench_turns(tasks: dict[str, Task], cache: Path, limit: int, rng: random.Random) -> Turns:
    """(task, prompt, accepted answers) for each chosen example of the tasks, shuffled."""
    cache.mkdir(parents=True, exist_ok=True)
    turns = []
    with sdist_tasks(cache) as archive:
        for name, task in tasks.items():
            pool = examples(archive, task.path)
            chosen = rng.sample(pool, min(limit or task.count, task.count, len(pool)))
            for example in chosen:
                target = example["target"]
                targets = [str(t) for t in (target if isinstance(target, list) else [target])]
                turns.append((name, task.template.format(input=example["input"]), targets))
    rng.shuffle(turns)
    return turns


QUESTION_FIELDS = ("task", "prompt", "gold", "numeric", "max_tokens", "cloud_accuracy")
QUESTION_FORMAT = '{"task": ..., "prompt": ..., "gold": [...]} (docs/routing.md)'
TASK_FIELDS = ("numeric", "max_tokens", "cloud_accuracy")  # a task's, from its first line


@dataclass(frozen=True)
class Question:
    name: str  # its task's
    task: Task
    prompt: str
    targets: list[str]
    stated: frozenset[str]  # the TASK_FIELDS the line states


def read_questions(path: Path, limit: int, rng: random.Random) -> tuple[dict[str, Task], Turns, dict[str, str]]:
    """Tasks, (task, prompt, accepted answers) and where each prompt was first read, from a question file
    (see the module's docstring): every line checked, and the first bad one named, before any model runs;
    the turns are shuffled as BIG-bench's are."""
    tasks: dict[str, Task] = {}
    turns: Turns = []
    where: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        sys.exit(f"{path}: cannot read it as UTF-8 text ({exc}); save the question file as UTF-8 JSON lines")
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            q = question(line, path)
            same_task(tasks.setdefault(q.name, q.task), q)
        except ValueError as exc:
            sys.exit(f"{path}:{number}: {exc}")
        turns.append((q.name, q.prompt, q.targets))
        where.setdefault(q.prompt, f"{path}:{number}")
    if not turns:
        sys.exit(f"{path}: no questions")
    repeated = len(turns) - len({t[1] for t in turns})
    if repeated:
        print(
            f"{path}: {repeated} questions repeat an earlier prompt: a replay learns the repeats' labels "
            "from the first",
            file=sys.stderr,
        )
    rng.shuffle(turns)
    if limit:  # the first `limit` of each task, as the shuffle left them
        taken: dict[str, int] = {}
        kept = []
        for turn in turns:
            if taken.get(turn[0], 0) < limit:
                taken[turn[0]] = taken.get(turn[0], 0) + 1
                kept.append(turn)
        turns = kept
    return tasks, turns, where


def question(line: str, path: Path) -> Question:
    """One question line, checked: a ValueError says what is wrong with it."""
    try:
        q = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc}); each line is one object: {QUESTION_FORMAT}") from None
    if not isinstance(q, dict):
        raise ValueError(f"a JSON {type(q).__name__}, not an object: {QUESTION_FORMAT}")
    unknown = sorted(set(q) - set(QUESTION_FIELDS))
    if unknown:
        raise ValueError(f"unknown field {', '.join(map(repr, unknown))} (the fields are {', '.join(QUESTION_FIELDS)})")
    missing = [f for f in ("task", "prompt", "gold") if f not in q]
    if missing:
        raise ValueError(f"missing {', '.join(map(repr, missing))}: {QUESTION_FORMAT}")
    name, prompt, gold, numeric = q["task"], q["prompt"], q["gold"], q.get("numeric", False)
    targets = gold if isinstance(gold, list) else [gold]
    if not isinstance(name, str) or not name.strip() or not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("task and prompt must be non-empty strings")
    if not targets or not all(isinstance(t, (str, int, float)) and normalise(str(t)) for t in targets):
        raise ValueError("gold must be a non-empty list of answers, each with a letter or digit in it")
    if not isinstance(numeric, bool):
        raise ValueError(f"numeric must be true or false, not {numeric!r}")
    targets = [str(t) for t in targets]
    if numeric and not all(re.fullmatch(r"-?\d+", t.replace(",", "")) for t in targets):
        raise ValueError("gold answers must be whole numbers for a numeric question (graded by the last number stated)")
    max_tokens, cloud_accuracy = q.get("max_tokens", 32), q.get("cloud_accuracy", 0.9)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a whole number of at least 1, not {max_tokens!r}")
    if isinstance(cloud_accuracy, bool) or not isinstance(cloud_accuracy, (int, float)) or not 0 <= cloud_accuracy <= 1:
        raise ValueError(f"cloud_accuracy must be a number within 0-1, not {cloud_accuracy!r}")
    task = Task(f"{path.name}:{name}", 0, "{input}", max_tokens, task_of(prompt), float(cloud_accuracy), numeric)
    targets = [t.replace(",", "") if numeric else t for t in targets]
    return Question(name, task, prompt, targets, frozenset(TASK_FIELDS) & set(q))


def same_task(first: Task, q: Question) -> None:
    """A line may restate its task's numeric, max_tokens and cloud_accuracy, not change them: the task takes
    its first line's values, and a silent difference would grade or price some of its questions otherwise."""
    for key in sorted(q.stated):
        if getattr(first, key) != getattr(q.task, key):
            raise ValueError(
                f"{key} {getattr(q.task, key)!r} differs from task {q.name!r}'s {getattr(first, key)!r} (set on "
                "its first line, or the default): give every line of a task the same value"
            )


def rerun_local(model: LocalModel, tasks: dict[str, Task], source: Path, out: Path, origin: str) -> None:
    """Run the local model again over a trace's prompts, keeping everything else (the cloud labels too).
    Where the answer is the one the trace holds, so is its wall time: the same computation, timed when the
    trace was built, on a machine this rerun may share. The trace is checked whole first (policy/trace.py): a
    bad line stopped the rerun with a traceback, after the model had answered every line before it."""
    try:
        rows = read_rows(source)
        old_name = local_model(rows, source)
    except PolicyError as exc:
        sys.exit(str(exc))
    ungraded = next((n for n, row in enumerate(rows, 1) if not isinstance(row.get("gold"), list)), None)
    if ungraded:
        sys.exit(f"{source}:{ungraded}: no 'gold' list, which the local model's new answer is graded against")
    unknown = sorted({row["task"] for row in rows} - set(tasks))
    if unknown:
        sys.exit(
            f"{source}: its tasks {', '.join(map(repr, unknown))} are not among those given; a trace of your own "
            "questions reruns with --questions FILE beside --rerun-local (BIG-bench's with --tasks)"
        )
    accuracy: dict[str, list[int]] = {t: [] for t in tasks}
    changed, started = 0, time.time()
    for n, row in enumerate(rows):
        task = tasks[row["task"]]
        text, fields, local_s, _, _ = answer(model.llm, row["prompt"], task.max_tokens)
        old = row["models"].pop(old_name)
        local = local_fields(task, row["gold"], text, fields, local_s, model.sha256, task.max_tokens)
        if fields["answer"] == old.get("answer"):
            local["latency_s"], local["energy_j"] = old["latency_s"], old["energy_j"]
        else:
            changed += 1
        row["models"] = {model.name: local, **row["models"]}
        accuracy[row["task"]].append(local["satisfied"])
        progress(n, len(rows), started)
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"{changed} local answers differ from {source.name}'s", file=sys.stderr)
    write_meta(out, tasks, accuracy, model, origin)


def progress(n: int, total: int, started: float) -> None:
    """After turn ``n`` (from 0): every tenth of the way, the turns answered, the time taken and the time
    left at that pace (a large GGUF takes seconds a turn)."""
    done = n + 1
    if done % max(1, total // 10) == 0 or done == total:
        spent = time.time() - started
        left = f", about {spent / done * (total - done):.0f} s to go" if done < total else ""
        print(f"{done}/{total} turns answered in {spent:.0f} s{left}", file=sys.stderr, flush=True)


def write_meta(
    out: Path, tasks: dict[str, Task], accuracy: dict[str, list[int]], model: LocalModel, source: str
) -> None:
    meta = {
        "format": "locod replay trace v1 (docs/routing.md)",
        "source": source,
        "tasks": {name: task.path for name, task in tasks.items()},
        "seed": SEED,
        "turns": sum(len(v) for v in accuracy.values()),
        "local_model": f"{model.name} (greedy, really run; per-token log-probs kept)",
        "local_gguf_sha256": {model.name: model.sha256},
        "local_gguf_size": {model.name: model.size},
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
    print(f"wrote {out} ({meta['turns']} turns) and {out.with_suffix('.meta.json').name}", file=sys.stderr)
    print(f"local accuracy by task: {json.dumps(meta['local_accuracy'])}", file=sys.stderr)


if __name__ == "__main__":
    main()
