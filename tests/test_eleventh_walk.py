"""The eleventh new-user walk: a researcher brings their own question set to build_trace.py, replay.py and
fit_prior.py. Every test runs the scripts themselves on small files (the embedded model answers)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import locod_command, write_config

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
GOOD = {"task": "capitals", "prompt": "What is the capital of France? Answer with one word.", "gold": ["Paris"]}


def script(name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(SCRIPTS / name), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def questions(tmp_path: Path, *lines: object, raw: str = "") -> Path:
    path = tmp_path / "mine.jsonl"
    path.write_text(
        raw + "".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines)
    )
    return path


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ('["a", "list"]', "a JSON list, not an object"),
        ({**GOOD, "cloud_acuracy": 0.5}, "unknown field 'cloud_acuracy'"),
        ({**GOOD, "numeric": "no"}, "numeric must be true or false, not 'no'"),
        ({**GOOD, "gold": [""]}, "gold must be a non-empty list of answers"),
        ({**GOOD, "gold": ["four"], "numeric": True}, "gold answers must be whole numbers"),
        ({**GOOD, "max_tokens": "lots"}, "max_tokens must be a whole number"),
        ({**GOOD, "max_tokens": 8}, "max_tokens 8 differs from task 'capitals''s 32"),
    ],
)
def test_a_question_line_that_would_be_graded_otherwise_is_named(tmp_path: Path, line: object, said: str) -> None:
    """Each of these used to build a trace that graded or priced the line otherwise than its author meant
    (a typo'd field ignored, "no" read as true, a gold answer nothing can match, a task's limit changed
    silently), or failed with Python's words; now the build stops before any model runs, naming the line."""
    path = questions(tmp_path, GOOD, GOOD | {"prompt": "What is the capital of Peru?", "gold": ["Lima"]}, line)
    done = script("build_trace.py", "--questions", str(path), "--out", str(tmp_path / "t.jsonl"))
    assert done.returncode != 0 and f"{path}:3: {said}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "t.jsonl").exists()


def test_a_long_prompt_unicode_gold_and_repeats_build(tmp_path: Path, model_path: Path) -> None:
    """A prompt longer than the 512-token context the build used to answer with failed the whole build when
    its turn came; now the context is sized to the longest prompt before any answer. A file saved with a
    byte-order mark reads, a repeated question is reported, and the trace says where it went."""
    long = {"task": "long", "prompt": "Some background words. " * 150 + "What is 2 plus 2?", "gold": ["4"]}
    path = questions(
        tmp_path, GOOD, GOOD, long, {"task": "moscow", "prompt": "Capital of Russia?", "gold": "Москва"}, raw="\ufeff"
    )
    out = tmp_path / "trace.jsonl"
    done = script("build_trace.py", "--questions", str(path), "--out", str(out), "--threads", "1")
    assert done.returncode == 0, done.stderr
    assert "1 questions repeat an earlier prompt" in done.stderr and "\n4/4 turns answered in " in done.stderr
    assert "2/4 turns answered in " in done.stderr and " s to go" in done.stderr  # progress with the time left
    assert f"context for the longest prompt ({path}:3)" in done.stderr and f"wrote {out} (4 turns)" in done.stderr
    assert sorted(json.loads(row)["task"] for row in out.read_text().splitlines()) == [
        "capitals",
        "capitals",
        "long",
        "moscow",
    ]


def test_a_prompt_no_context_of_the_model_holds_is_named_before_any_answer(tmp_path: Path, model_path: Path) -> None:
    path = questions(tmp_path, GOOD, {"task": "huge", "prompt": "word " * 9000, "gold": ["x"]})
    done = script("build_trace.py", "--questions", str(path), "--out", str(tmp_path / "t.jsonl"))
    assert done.returncode != 0 and f"{path}:2: the prompt and its answer need about" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "t.jsonl").exists()


def test_grading_keeps_letters_of_every_script_and_folds_accents() -> None:
    """The grader kept only a-z and 0-9: a gold "Москва" matched nothing (every answer graded wrong), and
    "Brasília" needed the accent."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        from build_trace import Task, correct
    finally:
        sys.path.remove(str(SCRIPTS))
    task = Task("mine.jsonl:x", 0, "{input}", 32, "query", 0.9)
    assert correct(task, "The capital is Москва.", ["Москва"]) and not correct(task, "Paris", ["Москва"])
    assert correct(task, "It is Brasilia.", ["Brasília"]) and correct(task, "东京", ["东京"])


def test_the_trace_may_not_replace_its_question_file(tmp_path: Path) -> None:
    """routing.md's example once wrote the trace over the question file it was built from."""
    path = questions(tmp_path, GOOD)
    done = script("build_trace.py", "--questions", str(path), "--out", str(path))
    assert done.returncode != 0 and "the trace would replace your questions" in done.stderr
    assert json.loads(path.read_text()) == GOOD


TRACE = Path(__file__).resolve().parent.parent / "policy/data/bigbench_trace.jsonl"


def small_trace(tmp_path: Path, turns: int = 60) -> Path:
    """The shipped trace's first turns, with its meta, as a user's own trace of the embedded model."""
    out = tmp_path / "mine_trace.jsonl"
    out.write_text("".join(TRACE.read_text().splitlines(keepends=True)[:turns]))
    shutil.copy(TRACE.with_suffix(".meta.json"), out.with_suffix(".meta.json"))
    return out


def test_fit_prior_keeps_a_prior_already_there_unless_told(tmp_path: Path) -> None:
    """fit_prior.py on a trace the embedded model answered wrote over the shipped prior for that GGUF (the
    one the daemon and --split shipped start from) without a word."""
    trace, priors = small_trace(tmp_path), tmp_path / "priors"
    first = script("fit_prior.py", "--trace", str(trace), "--out", str(priors))
    assert first.returncode == 0, first.stderr
    (prior,) = priors.iterdir()
    before = prior.read_bytes()
    again = script("fit_prior.py", "--trace", str(trace), "--out", str(priors))
    assert again.returncode != 0 and f"{prior} already holds a prior for this GGUF" in again.stderr
    assert "--replace" in again.stderr and prior.read_bytes() == before
    assert script("fit_prior.py", "--trace", str(trace), "--out", str(priors), "--replace").returncode == 0


def test_replay_states_its_conditions_and_what_is_out_of_reach(tmp_path: Path) -> None:
    """The tables say what they rest on (seed, grader error, simulated cloud labels); an alpha no routing
    reaches says so instead of printing random routing at alpha; the plot goes beside the user's trace, not
    over docs/img's figure."""
    pytest.importorskip("matplotlib")
    trace = small_trace(tmp_path)
    done = script("replay.py", "--trace", str(trace), "--split", "none", "--alphas", "0.6", "1.0")
    assert done.returncode == 0, done.stderr
    assert "seed 1 (one seed" in done.stdout and "--grader-error 0.05" in done.stdout
    assert "cloud labels: simulated, not measured" in done.stdout
    assert "| 1.0 | random needs | - | - | out of reach |" in done.stdout
    assert (tmp_path / "replay_messplus.png").stat().st_size > 0


def test_replay_over_several_seeds_shows_each_routers_range(tmp_path: Path) -> None:
    """One seed's capture moved by tenths between seeds on a user's 106 questions; --seed 1 2 3 prints each
    router's means with its capture's range, so no one reads the second decimal of a single run."""
    pytest.importorskip("matplotlib")
    several = script(
        "replay.py",
        "--trace",
        str(small_trace(tmp_path)),
        "--split",
        "none",
        "--alphas",
        "0.6",
        "--seed",
        "1",
        "2",
        "3",
    )
    assert several.returncode == 0, several.stderr
    assert several.stdout.startswith("seeds 1, 2, 3 (each router's row: means, capture's range in brackets)")
    rows = [line for line in several.stdout.splitlines() if line.startswith("| 0.6 | price rule, V = 20, cold |")]
    assert len(rows) == 1 and " to " in rows[0].split("|")[6]


def renamed_trace(tmp_path: Path, turns: int = 120) -> Path:
    """The shipped trace's first turns as a trace of another GGUF (build_trace.py --model names it so)."""
    out = tmp_path / "other_trace.jsonl"
    rows = [json.loads(line) for line in TRACE.read_text().splitlines()[:turns]]
    for row in rows:
        row["models"]["qwen2.5-3b-instruct"] = row["models"].pop("smollm2-135m-instruct")
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


def test_a_policy_trains_and_is_evaluated_on_a_trace_of_another_gguf(tmp_path: Path) -> None:
    """The trace episodes of `locod policy train --trace` and evaluate_policy.py read the local model as
    "smollm2-135m-instruct": a trace built with --model of any other GGUF failed with a KeyError traceback.
    Now they read its one local model whatever its name, a broken line is named, and the evaluation's plot
    goes to the current folder, not over docs/evaluation.md's figure."""
    pytest.importorskip("torch")
    trace, onnx = renamed_trace(tmp_path), tmp_path / "mine.onnx"
    command = [*locod_command("policy", "train"), "--trace", str(trace), "--steps", "512", "--out", str(onnx)]
    trained = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert trained.returncode == 0 and onnx.stat().st_size > 0, trained.stderr
    evaluate = SCRIPTS / "evaluate_policy.py"
    command = [sys.executable, str(evaluate), "--episodes", "4", "--sla-seeds", "1", "--trace", str(trace)]
    evaluated = subprocess.run([*command, "--policy", str(onnx)], capture_output=True, text=True, cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "### replay trace (text only)" in evaluated.stdout and "+- - (one seed)" in evaluated.stdout
    assert (tmp_path / "evaluation_policy.png").stat().st_size > 0

    trace.write_text(trace.read_text() + "not json\n")
    for broken in (command, [*locod_command("policy", "train"), "--trace", str(trace), "--out", str(onnx)]):
        done = subprocess.run(broken, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert done.returncode != 0 and f"{trace}:121: not a trace line" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_train_policy_py_says_its_default_output_is_not_loaded() -> None:
    """scripts/train_policy.py --help called itself `locod policy train` and said its ./policy.onnx is what
    the daemon loads; the daemon reads the state directory's."""
    shown = script("train_policy.py", "--help")
    assert shown.returncode == 0 and shown.stdout.startswith("usage: train_policy.py")
    assert "which no daemon loads" in " ".join(shown.stdout.split())


def test_confidence_py_on_a_set_the_local_model_always_gets_right(tmp_path: Path) -> None:
    """On a trace whose local answers were all right, scripts/confidence.py died of a ZeroDivisionError; on a
    part the local model alone carries it printed 'nan' where replay.py prints '-'."""
    trace = renamed_trace(tmp_path, 200)
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    for row in rows:
        row["models"]["qwen2.5-3b-instruct"]["satisfied"] = 1
    trace.write_text("".join(json.dumps(row) + "\n" for row in rows))
    done = script("confidence.py", "--trace", str(trace))
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert f"{trace}: the local model is always right on it" in done.stderr, done.stderr
    for row in rows:  # the local model right on 3 in 4 turns of two tasks, on 1 in 4 of the rest
        easy = row["task"] in ("add_2digit", "wikidata")
        row["models"]["qwen2.5-3b-instruct"]["satisfied"] = int((row["turn"] + len(row["prompt"])) % 4 < 1 + 2 * easy)
    trace.write_text("".join(json.dumps(row) + "\n" for row in rows))
    done = script("confidence.py", "--trace", str(trace))
    assert done.returncode == 0, done.stderr
    assert "| add_2digit, past_tense, wikidata | " in done.stdout, done.stdout
    reference = done.stdout.split("| part |")[1]
    assert "| - |" in reference and "nan" not in reference and "(-: the local model alone" in done.stdout


def test_a_missing_or_empty_trace_and_a_negative_limit_are_named(tmp_path: Path) -> None:
    """replay.py, fit_prior.py and confidence.py met a mistyped --trace with a FileNotFoundError traceback,
    fit_prior.py a trace without its .meta.json too; build_trace.py --limit -1 died of an IndexError."""
    missing, empty, bare = tmp_path / "mistyped.jsonl", tmp_path / "empty.jsonl", tmp_path / "bare.jsonl"
    empty.write_text("")
    bare.write_text("".join(TRACE.read_text().splitlines(keepends=True)[:5]))
    expected = [
        ("replay.py", missing, f"{missing}: cannot read the trace"),
        ("confidence.py", missing, f"{missing}: cannot read the trace"),
        ("fit_prior.py", empty, f"{empty}: no turns in the trace"),
        ("fit_prior.py", bare, "does not say which (no bare.meta.json beside it)"),
    ]
    for name, trace, said in expected:
        out = [] if name == "confidence.py" else ["--out", str(tmp_path / "out")]
        done = script(name, "--trace", str(trace), *out)
        assert done.returncode != 0 and said in done.stderr and "Traceback" not in done.stderr, (name, done.stderr)
    limited = script(
        "build_trace.py", "--questions", str(questions(tmp_path, GOOD)), "--out", str(empty), "--limit", "-1"
    )
    assert limited.returncode != 0 and "--limit -1: a number of questions per task" in limited.stderr


def test_a_trace_of_your_own_questions_reruns_with_another_gguf(tmp_path: Path, model_path: Path) -> None:
    """--rerun-local of a trace of one's own questions died of a KeyError on its first task (it knew only
    BIG-bench's); with --questions beside it, the trace is answered again by the GGUF given."""
    path = questions(tmp_path, GOOD, {"task": "sums", "prompt": "What is 2 plus 3?", "gold": ["5"], "numeric": True})
    first, again = tmp_path / "first.jsonl", tmp_path / "again.jsonl"
    assert script("build_trace.py", "--questions", str(path), "--out", str(first)).returncode == 0
    alone = script("build_trace.py", "--rerun-local", str(first), "--out", str(again))
    assert alone.returncode != 0 and "are not among those given" in alone.stderr and "Traceback" not in alone.stderr
    gguf = tmp_path / "another.gguf"
    gguf.symlink_to(model_path)
    rerun = ("--rerun-local", str(first), "--questions", str(path), "--model", str(gguf), "--out", str(again))
    done = script("build_trace.py", *rerun)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in again.read_text().splitlines()]
    assert [set(r["models"]) for r in rows] == [{"another", "cloud"}] * 2


def test_a_trace_of_one_task_or_one_turn_is_replayed_or_refused_in_words(tmp_path: Path) -> None:
    """replay.py --split task on a trace of one task (and --split half on one turn) died in fit_logistic's
    matrix product, as did confidence.py's reference on one task; now they say why, or leave out the empty
    part."""
    pytest.importorskip("matplotlib")
    trace = small_trace(tmp_path, 400)
    rows = [row for row in map(json.loads, trace.read_text().splitlines()) if row["task"] == "plural"]
    trace.write_text("".join(json.dumps(row) + "\n" for row in rows))
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(rows[0]) + "\n")
    for split, path, said in (("task", trace, "(the trace has one: plural)"), ("half", one, "(the trace has 1)")):
        done = script("replay.py", "--trace", str(path), "--split", split, "--out", "")
        assert done.returncode != 0 and said in done.stderr and "Traceback" not in done.stderr, done.stderr
    reference = script("confidence.py", "--trace", str(trace))
    assert reference.returncode == 0, reference.stderr
    assert "| plural | " in reference.stdout and "|  |" not in reference.stdout


def test_a_model_path_that_is_no_gguf_is_named(tmp_path: Path) -> None:
    """--model of a mistyped path or of a file that is no GGUF died in a traceback (FileNotFoundError, or
    llama.cpp's 'Failed to load model')."""
    fake = tmp_path / "model.gguf"
    fake.write_text("not a model")
    path = questions(tmp_path, GOOD)
    for model, said in ((tmp_path / "typo.gguf", "cannot read it (No such file"), (fake, "is not a GGUF file")):
        done = script("build_trace.py", "--questions", str(path), "--model", str(model), "--out", str(tmp_path / "t"))
        assert done.returncode != 0 and f"--model {model}: " in done.stderr and said in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_your_prior_goes_to_the_state_directory_and_the_daemon_starts_from_it(
    tmp_path: Path, daemon_factory: Any
) -> None:
    """fit_prior.py wrote into the package's policy/priors: over the shipped prior for a trace the embedded
    model answered, and, in an installed package (install.sh, quickstart.sh), into site-packages, which the
    next upgrade wipes and a service's own environment never reads. Now a user's prior goes to the state
    directory's priors/, which the daemon reads before the shipped ones."""
    home = tmp_path / "d"
    config = write_config(tmp_path / "config.toml", {})
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCOD_")}
    env.update(LOCOD_CONFIG=str(config), LOCOD_STATE_DIR=str(home / "state"))
    fitted = script("fit_prior.py", "--trace", str(small_trace(tmp_path)), env=env)
    assert fitted.returncode == 0, fitted.stderr
    (prior,) = (home / "state/priors").iterdir()
    assert (
        f"{prior}: a daemon whose state directory is {home / 'state'} starts smollm2-135m-instruct from it "
        "instead of the shipped prior" in fitted.stdout
    ), fitted.stdout
    handle = daemon_factory()
    assert "starts from the prior fitted on mine_trace.jsonl (sha256" in handle.log(), handle.log()
    status = handle.cli("status").stdout  # said where a user looks, not only in the log at its start
    assert f"learning  smollm2-135m-instruct from your prior {prior}, fitted on mine_trace.jsonl" in status, status
    assert "0 labels since" in status
    prior.unlink()
    assert handle.cli("reload").returncode == 0
    assert "smollm2-135m-instruct from the prior shipped for its GGUF, fitted on " in handle.cli("status").stdout


def test_a_local_model_wrong_on_every_turn_has_no_capture_blown_up(tmp_path: Path) -> None:
    """On 60 questions the local model always got wrong (4-digit products), knowing every label saved under
    one turn over random routing (0.712 against 0.700 at alpha 0.7), and the replay printed captures of
    -3.68 and 2.31: a turn's rounding divided by almost nothing. Now '-' there, as where nothing is to gain."""
    pytest.importorskip("matplotlib")
    trace = renamed_trace(tmp_path, 60)
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    for row in rows:
        row["models"]["qwen2.5-3b-instruct"]["satisfied"] = 0
        row["models"]["cloud"]["satisfied"] = int(row is not rows[7])
    trace.write_text("".join(json.dumps(row) + "\n" for row in rows))
    done = script(
        "replay.py", "--trace", str(trace), "--split", "none", "--alphas", "0.7", "--seed", "1", "2", "--out", ""
    )
    assert done.returncode == 0, done.stderr
    table = [
        line.split(" | ")
        for line in done.stdout.splitlines()
        if line.startswith("| 0.7 | ") and "shadow labels" not in line
    ]
    assert len(table) == 7 and all(cells[5].startswith("-") for cells in table), done.stdout


def test_a_quick_bigbench_build_does_not_overwrite_the_shipped_trace() -> None:
    """build_trace.py --limit 5 ("for a quick run", its help said) wrote its 35 turns over
    policy/data/bigbench_trace.jsonl, the trace the prior and every figure rest on; so did --model."""
    before = TRACE.stat().st_mtime_ns
    for extra in (("--limit", "5"), ("--model", str(TRACE))):
        done = script("build_trace.py", *extra)
        assert done.returncode != 0 and "make a trace other than the shipped one: name it with --out" in done.stderr
    assert TRACE.stat().st_mtime_ns == before
