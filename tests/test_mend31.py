"""Mend 31: what earlier sessions noticed and left alone, each confirmed on real parts and mended here.

A predictor prior is written whole or not at all; every number of ``[routing]`` whose nonsense value broke
the router is refused naming it, and a MESS+ state file's price window is checked like its other arrays;
the MESS+ state tells the log it was kept with from another (a backup restored, a new log) by the log's
identity, so it never settles or learns another log's turns as its own.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from locod.policy.messplus import DIM
from locod.policy.warmstart import Prior, read_prior, save_prior


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
