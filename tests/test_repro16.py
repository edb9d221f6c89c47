"""Where scripts/replay.py puts its plot: routing.md's cold-start and task-split commands (`--split none`,
`--split task`) replaced docs/img/replay_messplus.png, which the doc shows as the `--split half` run."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
TRACE = REPO / "policy/data/bigbench_trace.jsonl"


@pytest.mark.parametrize(
    ("argv", "docs_figure"),
    [
        ([], True),
        (["--seed", "1", "2", "3"], True),  # the plot is the first seed's runs
        (
            ["--alphas", "0.5", "0.6", "0.7", "0.8", "--trace", str(REPO / "policy/data/../data/bigbench_trace.jsonl")],
            True,
        ),
        (["--split", "none"], False),
        (["--split", "task"], False),
        (["--seed", "2"], False),
        (["--v", "50"], False),
        (["--alphas", "0.7"], False),
        (["--trace", str(TRACE.with_name("bigbench_unseen_trace.jsonl"))], False),
    ],
)
def test_only_the_run_docs_routing_shows_replaces_its_figure(
    argv: list[str], docs_figure: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("matplotlib")
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import replay

    parser = replay.argument_parser()
    args = parser.parse_args(argv)
    assert replay.default_out(args, parser) == (REPO / "docs/img" if docs_figure else Path(args.trace).parent)
