#!/usr/bin/env python3
"""Does the local model's own view of a prompt predict whether it will answer it right? (docs/routing.md, "The
local model's own view of the prompt"; issue #18.)

Each trace prompt is rendered with the GGUF's chat template as the daemon sends it (one user message) and run
through the model once with embeddings on; its final hidden states are pooled two ways, their mean over the
prompt's tokens and the last token's (the one the answer's first token is predicted from), and cached as
.npy under --cache with each prompt's time and token count. Then, per trace, the AUC against the local label
(whole trace, and within tasks: the mean of per-task AUCs weighted by turns, which the task alone cannot
rank) of a logistic head over
- the hashed words (MESS+'s own features: n-grams and dense ones, task included),
- each pooled embedding, alone and after the words (concatenated),
measured two ways: fitted on the first half and scored on the second (as scripts/confidence.py does for the
prompt-only predictor; L2 strength chosen by 2-fold cross-validation within the first half), and online in
streaming order, each turn scored before its label trains the head (MessPlus.train's SGD step), the AUC
taken over the second half's turns. With --replay mean|last, instead: scripts/replay.py's tables over the
same seeds with the local model's head on MESS+'s features, then on those and that embedding.

    OMP_WAIT_POLICY=PASSIVE python scripts/embed_probe.py [--trace T ...] [--limit N] [--cache DIR] [--json OUT]
    OMP_WAIT_POLICY=PASSIVE python scripts/embed_probe.py --replay mean [--seed 1 2 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import tempfile
import time
from pathlib import Path

import llama_cpp
import numpy as np
from confidence import auc, within_task
from fit_prior import LOCAL, prompt_matrix, read_trace
from llama_cpp import Llama, llama_chat_format
from replay import DEV_TRACE, Turn, argument_parser, shipped, table, turns

from locod.policy.messplus import DIM, _prior_weights
from locod.policy.rule import LOCAL_PRIOR
from locod.policy.warmstart import fit_logistic

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "models/SmolLM2-135M-Instruct.Q4_1.gguf"
TRACES = [REPO / f"policy/data/bigbench_{name}trace.jsonl" for name in ("", "unseen_", "third_")]
POOLINGS = ("mean", "last")
L2_GRID = (1e-3, 1e-2, 1e-1)
N_CTX = 2048  # the third trace's longest prompt is about 900 tokens with the template


def open_model(path: Path, threads: int) -> Llama:
    """The GGUF with embeddings on and no pooling (each token's final hidden state comes back; both poolings
    are taken from them, so one pass serves both)."""
    return Llama(
        model_path=str(path),
        embedding=True,
        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE,
        n_ctx=N_CTX,
        n_batch=N_CTX,
        n_ubatch=N_CTX,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )


def chat_formatter(llm: Llama) -> llama_chat_format.Jinja2ChatFormatter:
    """The GGUF's own chat template, as llama-cpp-python renders it for create_chat_completion (the daemon's
    path when no chat_format is configured)."""
    token_text = [
        llm.detokenize([t], special=True).decode("utf-8", "ignore") for t in (llm.token_eos(), llm.token_bos())
    ]
    return llama_chat_format.Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"], eos_token=token_text[0], bos_token=token_text[1]
    )


def chat_tokens(llm: Llama, formatter: llama_chat_format.Jinja2ChatFormatter, prompt: str) -> list[int]:
    """The tokens llama.cpp reads for a turn with this one user message, as create_chat_completion makes them."""
    rendered = formatter(messages=[{"role": "user", "content": prompt}])
    return llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)


def decode(llm: Llama, tokens: list[int], n_past: int) -> np.ndarray:
    """The final hidden states (n_tokens x n_embd) of ``tokens`` read after the first ``n_past`` already in
    the context, decoded as Llama.embed does (embed() itself tokenizes plain text, without the template's
    special tokens, and always from position 0)."""
    llm._ctx.kv_cache_seq_rm(0, n_past, -1)
    llm._batch.set_batch(batch=tokens, n_past=n_past, logits_all=True)
    llm._ctx.decode(llm._batch)
    n_embd = llm.n_embd()
    states = np.ctypeslib.as_array(llama_cpp.llama_get_embeddings(llm._ctx.ctx), shape=(len(tokens) * n_embd,))
    return states.reshape(len(tokens), n_embd).astype(np.float64)


def shared_prefix(llm: Llama, formatter: llama_chat_format.Jinja2ChatFormatter) -> list[int]:
    """The tokens every turn's prompt starts with (the template's system turn and the user turn's opening):
    read once and kept in the context, as a dialogue cache would keep them."""
    a, b = (chat_tokens(llm, formatter, text) for text in ("a", "b"))
    n = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return a[:n]


def embed_prompts(llm: Llama, prompts: list[str]) -> dict[str, np.ndarray]:
    """Both poolings of every prompt (over all its tokens, the shared prefix's included), with the time the
    decode of its own tokens took (ms; the shared prefix is read once) and its token count."""
    formatter = chat_formatter(llm)
    prefix = shared_prefix(llm, formatter)
    llm._ctx.kv_cache_clear()
    prefix_sum = decode(llm, prefix, 0).sum(axis=0)
    out: dict[str, list] = {"mean": [], "last": [], "ms": [], "tokens": []}  # type: ignore[type-arg]
    for prompt in prompts:
        tokens = chat_tokens(llm, formatter, prompt)
        if tokens[: len(prefix)] != prefix:
            raise SystemExit(f"a prompt's template does not start as every other's does: {prompt[:80]!r}")
        started = time.perf_counter()
        states = decode(llm, tokens[len(prefix) :], len(prefix))
        out["ms"].append((time.perf_counter() - started) * 1000)
        out["tokens"].append(len(tokens))
        out["mean"].append((prefix_sum + states.sum(axis=0)) / len(tokens))
        out["last"].append(states[-1])
    return {k: np.asarray(v) for k, v in out.items()}


def cached_embeddings(trace: Path, prompts: list[str], args: argparse.Namespace) -> dict[str, np.ndarray]:
    """The prompts' embeddings from --cache (keyed by the prompts and the GGUF), made once."""
    digest = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:12]
    gguf = hashlib.sha256(Path(args.model).read_bytes()).hexdigest()[:12]
    stem = Path(args.cache) / f"{trace.stem}.{digest}.{gguf}"
    paths = {k: Path(f"{stem}.{k}.npy") for k in ("mean", "last", "ms", "tokens")}
    if all(p.exists() for p in paths.values()):
        return {k: np.load(p) for k, p in paths.items()}
    llm = open_model(Path(args.model), args.threads)
    embedded = embed_prompts(llm, prompts)
    llm.close()
    stem.parent.mkdir(parents=True, exist_ok=True)
    for k, p in paths.items():
        np.save(p, embedded[k])
    return embedded


def standardised(x: np.ndarray, fit_on: slice) -> np.ndarray:
    """Each dimension centred and scaled on the ``fit_on`` rows, over sqrt(dims) so a row's norm is about 1
    (as the hashed n-grams' are), with a bias column."""
    mean, std = x[fit_on].mean(axis=0), x[fit_on].std(axis=0) + 1e-6
    z = (x - mean) / std / math.sqrt(x.shape[1])
    return np.hstack([z, np.ones((len(x), 1))])


def fitted_scores(x: np.ndarray, y: np.ndarray, start: np.ndarray, half: int) -> np.ndarray:
    """Scores of the second half's rows from a head fitted on the first half, its L2 strength chosen by
    2-fold cross-validation within the first half."""
    folds = np.arange(half) % 2

    def cv_auc(l2: float) -> float:
        score = np.zeros(half)
        for k in (0, 1):
            w = fit_logistic(x[:half][folds != k], y[:half][folds != k], start, l2=l2)
            score[folds == k] = x[:half][folds == k] @ w
        return auc(score, y[:half])

    best = max(L2_GRID, key=cv_auc)
    return x[half:] @ fit_logistic(x[:half], y[:half], start, l2=best)


def online_scores(x: np.ndarray, y: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Each turn's score before its own label trains the head: MessPlus.train's step (rate 0.5 /
    sqrt(1 + labels / 50), L2 1e-4) over every feature, in streaming order."""
    w, scores = start.astype(np.float64).copy(), np.zeros(len(y))
    for i, (row, label) in enumerate(zip(x, y)):
        scores[i] = row @ w
        p = 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, scores[i]))))
        w -= 0.5 / math.sqrt(1.0 + i / 50.0) * ((p - label) * row + 1e-4 * w)
    return scores


def feature_sets(rows: list[dict], embedded: dict[str, np.ndarray], fit_on: slice) -> dict[str, tuple]:  # type: ignore[type-arg]
    """(features, starting weights) of each head: the words from MESS+'s cold prior, the embeddings from 0;
    each embedding alone (with its bias) and after the words (whose dense features hold the bias)."""
    words, words_start = prompt_matrix(rows), _prior_weights(LOCAL_PRIOR)
    heads = {"hashed words (MESS+)": (words, words_start)}
    for pooling in POOLINGS:
        z = standardised(embedded[pooling], fit_on)
        heads[f"embedding, {pooling}"] = (z, np.zeros(z.shape[1]))
        both = np.concatenate([words_start, np.zeros(z.shape[1] - 1)])
        heads[f"words + embedding, {pooling}"] = (np.hstack([words, z[:, :-1]]), both)
    return heads


def probe(trace: Path, args: argparse.Namespace) -> dict:  # type: ignore[type-arg]
    rows = read_trace(trace)[: args.limit]
    embedded = cached_embeddings(trace, [r["prompt"] for r in rows], args)
    y = np.array([r["models"][LOCAL]["satisfied"] for r in rows], dtype=np.float64)
    tasks = np.array([r["task"] for r in rows])
    half = len(rows) // 2
    heads = {}
    for name, (x, start) in feature_sets(rows, embedded, slice(0, half)).items():
        held_out, online = fitted_scores(x, y, start, half), online_scores(x, y, start)[half:]
        heads[name] = {
            "fitted_auc": auc(held_out, y[half:]),
            "fitted_within_task": within_task(held_out, y[half:], tasks[half:]),
            "online_auc": auc(online, y[half:]),
            "online_within_task": within_task(online, y[half:], tasks[half:]),
        }
    return {
        "trace": trace.name,
        "turns": len(rows),
        "local_accuracy": float(y.mean()),
        "embed_ms_mean": float(embedded["ms"].mean()),
        "tokens_mean": float(embedded["tokens"].mean()),
        "heads": heads,
    }


def replay_with_embedding(trace: Path, args: argparse.Namespace) -> None:
    """The replay's tables (scripts/replay.py, cold and from the shipped prior where it was not fitted on this
    trace) twice over the same seeds: the local head on MESS+'s features, then on those and the pooled
    embedding (standardised over the whole trace: no label is used)."""
    rows = read_trace(trace)[: args.limit]
    embedded = cached_embeddings(trace, [r["prompt"] for r in rows], args)
    plain = turns(rows)
    extra = standardised(embedded[args.replay], slice(None))[:, :-1]  # MESS+'s features hold a bias already
    own = [dataclasses.replace(t, local_x=with_embedding(t, e)) for t, e in zip(plain, extra)]
    options = argument_parser().parse_args(["--alphas", "0.5", "0.6", "0.7", "--seed", *map(str, args.seed)])
    prior = None if trace.resolve() == DEV_TRACE else shipped(rows)[1]
    for features, replayed in (("MESS+'s features", plain), (f"MESS+'s features + the {args.replay} embedding", own)):
        table(f"{trace.name}, local head on {features}", replayed, prior, options)


def with_embedding(t: Turn, embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MESS+'s sparse features of a turn followed by the embedding's, at indices past MESS+'s DIM."""
    return np.concatenate([t.x[0], DIM + np.arange(len(embedding))]), np.concatenate([t.x[1], embedding])


FIGURES = ("fitted_auc", "fitted_within_task", "online_auc", "online_within_task")


def print_table(results: list[dict]) -> None:  # type: ignore[type-arg]
    print("| trace | turns | embed ms / prompt (past the shared opening) | tokens / prompt | head", end="")
    print(" | AUC, fitted on the first half", end="")
    print(" | within tasks | AUC, online (second half) | within tasks |\n|---|---|---|---|---|---|---|---|---|")
    for r in results:
        shown = f"| {r['trace']} | {r['turns']} | {r['embed_ms_mean']:.1f} | {r['tokens_mean']:.0f}"
        for name, h in r["heads"].items():
            print(f"{shown} | {name} | {' | '.join(f'{h[k]:.3f}' for k in FIGURES)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", nargs="+", default=[str(t) for t in TRACES], help="default: all three traces")
    parser.add_argument("--model", default=str(MODEL), help="the GGUF that answered the traces (default: the embedded)")
    parser.add_argument("--limit", type=int, help="only the first N turns of each trace (a quick look)")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (default: 1)")
    parser.add_argument(
        "--cache",
        default=str(Path(tempfile.gettempdir()) / "locod-embed-probe"),
        help="folder for the embeddings (.npy), made once per trace and GGUF (default: in the temp folder)",
    )
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument(
        "--replay",
        choices=POOLINGS,
        help="instead of the AUCs: the replay's tables with the local head on MESS+'s features and that embedding",
    )
    parser.add_argument("--seed", type=int, nargs="+", default=[1, 2, 3], help="the replay's seeds (default: 1 2 3)")
    args = parser.parse_args()
    if args.replay:
        for trace in args.trace:
            replay_with_embedding(Path(trace), args)
        return
    results = [probe(Path(t), args) for t in args.trace]
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
