"""Mend 31: what earlier sessions noticed and left alone, each confirmed on real parts and mended here.

A predictor prior is written whole or not at all; every number of ``[routing]`` whose nonsense value broke
the router is refused naming it, and a MESS+ state file's price window is checked like its other arrays;
the MESS+ state tells the log it was kept with from another (a backup restored, a new log) by the log's
identity, so it never settles or learns another log's turns as its own.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from locod.daemon.config import load_config
from locod.errors import ConfigError
from locod.policy.messplus import DIM, MessPlus
from locod.policy.warmstart import Prior, read_prior, save_prior

from .conftest import write_config


def test_a_prior_cut_short_while_written_leaves_the_good_one_it_replaced(tmp_path: Path) -> None:
    """``save_prior`` wrote the prior in place (``open("wb")``): a refit over a good prior (scripts/fit_prior.py
    writes the user's with it) cut short by a crash, a power loss or a full disk left a damaged file where the
    good one was, which the daemon then left out ("is unreadable"). Now it is written beside it, fsynced and
    renamed. The cut is real: a process whose file-size limit (RLIMIT_FSIZE) stops the write part-way, as a
    full disk does."""
    folder = tmp_path / "priors"
    good = Prior("ab" * 32, 1234, np.full(DIM, 0.25), np.zeros(4), "the good one")
    path = save_prior(good, folder)
    refit = textwrap.dedent(
        f"""
        import resource, signal
        import numpy as np
        from pathlib import Path
        from locod.policy.warmstart import Prior, save_prior
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG), as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
        rng = np.random.default_rng(0)  # incompressible: far over the limit
        refit = Prior({good.sha256!r}, 1234, rng.normal(size={DIM}), np.zeros(4), "the refit")
        save_prior(refit, Path({str(folder)!r}))
        """
    )
    cut = subprocess.run([sys.executable, "-c", refit], capture_output=True, text=True, timeout=120)
    assert cut.returncode != 0 and "File too large" in cut.stderr, cut.stderr
    kept = read_prior(path)  # on the old code: "not a prior file, or a damaged one"
    assert kept.source == "the good one" and np.allclose(kept.weights, 0.25)
    assert sorted(p.name for p in folder.iterdir()) == [path.name]  # no half-written temp file left beside it


@pytest.mark.parametrize("v", [0, 0.0, 1e-320])
def test_a_v_that_makes_the_rule_weigh_nothing_or_overflow_is_refused_naming_the_key(tmp_path: Path, v: float) -> None:
    """``routing.v = 0`` was taken: every action's objective was then 0 (V * cost + V * price * ...), so each
    turn went to whichever action was listed first, whatever it cost or was predicted to satisfy; a V of
    1e-320 made the price of satisfaction (Z / V) inf. Both are refused as any out-of-range value is, in one
    line naming the file, the key and the range, from the file and from ``--set``."""
    path = write_config(tmp_path / "config.toml", {"routing": {"v": v}})
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert str(refused.value) == f"{path}: routing.v must be between 0.001 and 1000000.0, got {v!r}"
    with pytest.raises(ConfigError, match=r"^override routing.v: routing.v must be between 0.001 and"):
        load_config(write_config(tmp_path / "empty.toml", {}), overrides={"routing.v": str(v)})
    assert load_config(write_config(tmp_path / "least.toml", {"routing": {"v": 0.001}})).routing.v == 0.001


@pytest.mark.parametrize(
    ("bases", "steps", "why"),
    [
        (np.full(1000, 0.5), np.zeros((0, 3)), "expected (<= 256,)"),  # stayed 1,000 turns long for good
        (np.array([np.nan, 0.5]), np.zeros((0, 3)), "not finite"),
        (np.array([0.5, 0.5]), np.array([[0.0, -1e300, 0.2]]), "a negative price"),
        (np.array([0.5, 0.5]), np.array([[-1.0, 1.0, 0.2]]), "a step of no turn in it"),  # taken as the last turn's
        (np.array([7.0, 0.5]), np.zeros((0, 3)), "beyond [0, 1]"),
    ],
)
def test_a_state_file_whose_price_window_no_daemon_wrote_is_set_aside(
    tmp_path: Path, bases: np.ndarray, steps: np.ndarray, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The MESS+ state's price window (the last 256 turns' options, which set the feed-forward price) was
    restored unchecked: a window of 1,000 turns stayed 1,000 long (each turn drops one), a NaN or negative
    price decided the price of every turn after, a step of turn -1 was taken as the last turn's. Such a
    file is set aside as damaged, as one with arrays of the wrong shapes already was."""
    path = tmp_path / "messplus.npz"
    kept = mess_at(path)
    for decision in range(1, 4):
        kept.choose({"local": 0.01, "cloud": 1.0}, s_hat={"local": 0.3, "cloud": 0.95})
        kept.settle(decision, "local", 0.3)
    kept.save()
    assert len(mess_at(path).state.price.turns) == 3  # as written: taken
    with np.load(path) as saved:
        arrays = dict(saved)
    with path.open("wb") as f:
        np.savez(f, **{**arrays, "price_bases": bases, "price_steps": steps})
    with caplog.at_level(logging.ERROR, "locod.policy.messplus"):
        restarted = mess_at(path)
    assert why in caplog.text and "kept aside as" in caplog.text
    assert len(restarted.state.price.turns) == 0 and restarted.state.settled == 0
    assert [p.name.startswith("messplus.npz.bad-") for p in tmp_path.iterdir()] == [True]


def mess_at(path: Path) -> MessPlus:
    return MessPlus({"local": 0.5, "cloud": 0.85}, sla=0.8, v=20.0, explore_c=0.0, q_cap=50.0, path=path)
