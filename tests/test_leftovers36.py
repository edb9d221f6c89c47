"""Small defects earlier sessions noted and left (leftovers 36): a new user's first `locod decisions` and
`locod report`, an option a command does not take, `help` under a command, `status` past the daily cap,
the first-token chart without cloud turns, one estimate of a cloud message's tokens, a turn's cached
estimates through its decision, and an ONNX policy's side file read with no bound."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from locod.daemon.cloud_usage import estimated_input, message_tokens
from locod.daemon.config import CloudConfig, CloudModelConfig, Config
from locod.daemon.history import parse_since, read_history
from locod.daemon.prompts import history
from locod.daemon.records import DecisionLog, Outcome
from locod.daemon.sessions import Session
from locod.daemon.turn import Turn
from locod.errors import PolicyError
from locod.policy.observation import N_ACTIONS, OBS_DIM
from locod.policy.onnx_policy import DEFAULT_POLICY, MAX_POLICY_BYTES, OnnxPolicy, _session
from locod.policy.rule import estimate_tokens
from locod.protocol import ChatRequest
from locod.words import dollars

from .conftest import SECRET, locod_command
from .faultproxy import Fault, FaultProxy
from .test_attacks31 import CAP, MAX_TOKENS, capped_config
from .test_report import fill, record


def run_locod(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real `locod` as a new user runs it: no config file, no daemon, nothing in its state directory yet."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCOD_")}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / "config"), LOCOD_RUNTIME_DIR=str(home / "run"))
    env.update(XDG_STATE_HOME=str(home / "state"))
    return subprocess.run(locod_command(*args), capture_output=True, text=True, env=env, timeout=120, cwd=home)


def test_decisions_before_any_daemon_ran_is_an_empty_answer(tmp_path: Path) -> None:
    """`locod decisions` before a daemon ever ran exited 4, "the decision log cannot be used", as for a broken
    log: a new user's first look. It now says there are no decisions yet (exit 0; `--json` an empty array),
    and `locod report` says there is nothing to draw, as of an empty log (exit 1)."""
    listed = run_locod(tmp_path, "decisions")
    assert listed.returncode == 0, listed.stderr
    assert "no decisions yet" in listed.stderr and "locod serve" in listed.stderr
    as_json = run_locod(tmp_path, "decisions", "--json")
    assert as_json.returncode == 0 and as_json.stdout.strip() == "[]", as_json.stderr
    one = run_locod(tmp_path, "decisions", "5")
    assert one.returncode == 1 and "no decision record has the id '5'" in one.stderr
    report = run_locod(tmp_path, "report", "--out", str(tmp_path / "r.png"))
    assert report.returncode == 1 and "nothing to draw" in report.stderr, report.stderr


def test_a_directory_where_the_log_should_be_is_still_a_storage_error(tmp_path: Path) -> None:
    """Only a log that is not there reads as no decisions: one that cannot be used still exits 4."""
    (tmp_path / "state" / "locod" / "locod.db").mkdir(parents=True)
    listed = run_locod(tmp_path, "decisions")
    assert listed.returncode == 4 and "no decision log at" in listed.stderr, listed.stderr


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["ask", "-m", "x", "hi"], "no such option: -m (did you mean --model or --max-tokens?)"),
        (["ask", "--modle", "x", "hi"], "no such option: --modle (did you mean --model?)"),
        (["decisions", "-n", "5"], "no such option: -n;"),
        (["models", "pull", "-n", "foo", "http://127.0.0.1:9/y.gguf"], "no such option: -n (did you mean --name?)"),
        (["feedback", "--label=good", "3", "good"], "no such option: --label"),
    ],
)
def test_an_option_a_command_does_not_take_is_named_alone(tmp_path: Path, argv: list[str], said: str) -> None:
    """argparse took the value after an unknown option as the command's argument and called the rest
    unrecognized: `locod ask -m x hi` read "x" as the prompt and said "unrecognized arguments: -m hi",
    `models pull -n NAME URL` "-n URL", under the usage of `locod` itself. Now the option is named alone,
    with what it may have meant, under the command's own usage; nothing runs."""
    result = run_locod(tmp_path, *argv)
    assert result.returncode == 2, result.stderr
    assert said in result.stderr, result.stderr
    assert f"usage: locod {' '.join(w for w in argv[:2] if not w.startswith('-'))}" in result.stderr
    assert f"`locod {argv[0]}" in result.stderr
    assert not (tmp_path / "state").exists()  # nothing ran: no model pulled, no log read


@pytest.mark.parametrize(
    ("argv", "same_as"),
    [
        (["models", "help"], ["models", "--help"]),
        (["models", "help", "pull"], ["models", "pull", "--help"]),
        (["config", "help", "show"], ["config", "show", "--help"]),
        (["policy", "help"], ["policy", "--help"]),
        (["help", "models", "list"], ["models", "list", "--help"]),
    ],
)
def test_help_under_a_command_is_its_help(tmp_path: Path, argv: list[str], same_as: list[str]) -> None:
    """`locod help models` was `locod models --help`, but `locod models help` was refused as "invalid choice:
    'help'": help at any level is the help of the command (or action) it is beside."""
    result, expected = run_locod(tmp_path, *argv), run_locod(tmp_path, *same_as)
    assert result.returncode == expected.returncode == 0, result.stderr
    assert result.stdout == expected.stdout and result.stdout.startswith("usage: locod ")


def test_help_as_a_prompt_is_still_a_prompt() -> None:
    """`locod ask help` asks "help": a command without actions takes the word as its argument."""
    from locod.cli import _help_as_an_option, _parser

    assert _help_as_an_option(["ask", "help"], _parser()) == ["ask", "help"]
    assert _help_as_an_option(["--config", "help", "models", "help"], _parser()) == [
        "--config",
        "help",
        "models",
        "--help",
    ]


def test_status_says_by_how_much_the_daily_cap_was_passed(daemon_factory: Any, proxy: FaultProxy) -> None:
    """An endpoint billing ten times the tokens asked for spent four times the daily cap in one turn, and
    `locod status` said the cap was "reached", as of a spend that had just touched it. It now says by how
    much it was passed; a spend at the cap is still "reached"."""
    handle = daemon_factory(capped_config(proxy.base_url), extra_env={"LOCOD_CLOUD_API_KEY": SECRET})
    proxy.set(Fault("usage", usage={"prompt_tokens": 10, "completion_tokens": 10 * MAX_TOKENS, "total_tokens": 90}))
    assert handle.client().ask("Say one word.", max_tokens=MAX_TOKENS).decision.location == "cloud"
    billed = 10 * MAX_TOKENS * 1000 / 1e6
    shown = handle.cli("status").stdout
    assert f"today {dollars(billed)} of the {dollars(CAP)} cap: passed by {dollars(billed - CAP)} (4.0 times" in shown
    assert "the cloud is off until local midnight" in shown and ": reached" not in shown


def first_token_legend(db: Path) -> list[str]:
    """The places the report's first-token chart names, for the log at ``db``."""
    from locod.report import figure

    fig = figure(read_history(db, parse_since("3h")), 0.0, "t")
    (chart,) = [ax for ax in fig.axes if ax.get_title() == "first-token time (median)"]
    legend = chart.get_legend()
    return [] if legend is None else [text.get_text() for text in legend.get_texts()]


def test_the_first_token_chart_names_only_places_that_answered(tmp_path: Path) -> None:
    """A log of local turns alone (no cloud configured) drew "cloud" in the first-token chart's legend, an
    empty line beside the local one, as if cloud answers had been measured. Only places with times are drawn
    and named; a log with both names both."""
    pytest.importorskip("matplotlib")
    local_only, both = tmp_path / "local.db", tmp_path / "both.db"
    log = DecisionLog(local_only)
    for first_ms in (100.0, 140.0):
        decision = log.begin(record("local"))
        log.finish(decision, Outcome("ok", "local", "local", latency_first_token_ms=first_ms))
    log.close()
    assert first_token_legend(local_only) == ["local"]
    fill(both, time.time())
    assert first_token_legend(both) == ["local", "cloud"]


def test_a_decided_turn_keeps_what_was_reckoned_of_it() -> None:
    """The turn is replaced for its decision (``dataclasses.replace``: its config, device and hold), which
    dropped the question's estimate cached on it (a ``cached_property``): the decided turn estimated the whole
    question again. What is reckoned of a turn is now handed on. And the question's message is priced by the
    one rule every message is (``message_tokens``), with the estimate the turn carries."""
    session = Session("s", owner="ipc")
    session.dialogue = (({"role": "user", "content": "earlier: 你好"},), (False,))
    request = ChatRequest("r", [{"role": "user", "content": "What is the capital of France? " * 40}])
    turn = Turn(request, session, b"c", "chat", [], Config(), prompt_estimate=7)
    model = CloudModelConfig(name="m", base_url="http://127.0.0.1:9/v1", model="m", usd_per_mtok_in=1e6)
    config = Config(cloud=CloudConfig(models=[model]))
    decided = dataclasses.replace(turn, config=config)
    assert decided.prompt_tokens == 7 and decided.text_bytes == turn.text_bytes
    earlier = estimated_input(history(decided, cloud=True))
    assert decided.cloud_price(config, "m", (), 0) == earlier + message_tokens(7)  # a dollar a token
    assert estimated_input([{"role": "user", "content": "你好"}]) == message_tokens(estimate_tokens("你好"))


def policy_with_side_file(folder: Path, side_bytes: int) -> Path:
    """A 125-byte ONNX model whose one weight, ``side_bytes`` of float32, is external data in ``w`` beside it
    (a sparse file: no disk is spent on it)."""
    from onnx import TensorProto, helper

    weight = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[side_bytes // 4])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "w"), ("offset", "0"), ("length", str(side_bytes))):
        weight.external_data.add(key=key, value=value)
    summed = helper.make_node("ReduceSum", ["W"], ["y"], keepdims=0)
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [])
    graph = helper.make_graph([summed], "g", [], [output], [weight])
    path = folder / "policy.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    with (folder / "w").open("wb") as side:
        side.truncate(side_bytes)
    return path


def test_a_policy_s_side_file_is_bounded_as_the_policy_file_is(tmp_path: Path) -> None:
    """The policy file is read up to MAX_POLICY_BYTES, but the side file it keeps its weights in (ONNX
    external data) was read by onnxruntime with no bound: a 125-byte policy naming a 512 MiB side file took a
    gigabyte of memory at load, on the daemon's serving loop. The side file is now bounded as the policy is
    (the two together) and must be a regular file, refused by name before onnxruntime reads it."""
    pytest.importorskip("onnx")
    path = policy_with_side_file(tmp_path, MAX_POLICY_BYTES + 4)
    with pytest.raises(PolicyError) as refused:
        OnnxPolicy(path)
    assert refused.value.code == "policy_corrupt"
    assert f"its external data file {tmp_path / 'w'}: over {MAX_POLICY_BYTES} bytes" in refused.value.message
    (tmp_path / "w").unlink()
    os.mkfifo(tmp_path / "w")
    with pytest.raises(PolicyError, match=r"external data file .*/w: not a regular file"):
        OnnxPolicy(path)
    (tmp_path / "w").unlink()
    with pytest.raises(PolicyError, match=r"external data file .*/w: No such file"):
        OnnxPolicy(path)


def test_a_policy_within_the_bound_with_its_side_file_still_loads(tmp_path: Path) -> None:
    """The shipped policy saved with its weights beside it is read as before: the bound counts the side file
    the graph names (found in its tensors), and it decides as the whole file does."""
    import numpy as np
    import onnx

    onnx.save(onnx.load(str(DEFAULT_POLICY)), str(tmp_path / "p.onnx"), save_as_external_data=True, location="w")
    assert (tmp_path / "w").stat().st_size > 0
    observation = np.random.default_rng(36).random(OBS_DIM, dtype=np.float32)
    mask = np.ones(N_ACTIONS, dtype=np.float32)
    split, whole = OnnxPolicy(tmp_path / "p.onnx"), OnnxPolicy(DEFAULT_POLICY)
    assert np.array_equal(split.log_probs(observation, mask), whole.log_probs(observation, mask))
    small = tmp_path / "small"
    small.mkdir()
    assert _session(policy_with_side_file(small, 4096)) is not None  # a side file of its own, within the bound


def _delimited(number: int, payload: bytes) -> bytes:
    """A protobuf length-delimited field: key, varint length, payload."""
    out, size = bytearray([number << 3 | 2]), len(payload)
    while True:
        out.append(size & 0x7F | (0x80 if size > 0x7F else 0))
        size >>= 7
        if not size:
            return bytes(out) + payload


def test_a_policy_nested_thousands_deep_is_refused_by_name(tmp_path: Path) -> None:
    """The walk that finds a policy's side files follows subgraphs: a file of graphs nested 3,000 deep
    (node -> attribute -> graph, a few bytes a level) stopped it with RecursionError, not a PolicyError
    naming the file. protobuf's own limit, 100 deep, is the walk's too."""
    graph = b""
    for _ in range(3000):
        graph = _delimited(1, _delimited(5, _delimited(6, graph)))  # graph.node -> node.attribute -> .g
    path = tmp_path / "deep.onnx"
    path.write_bytes(_delimited(7, graph))
    with pytest.raises(PolicyError, match=r"deep.onnx is not a loadable ONNX model") as refused:
        OnnxPolicy(path)
    assert refused.value.code == "policy_corrupt"
