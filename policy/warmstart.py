"""Predictor priors shipped for known local models, so that a fresh install routes well from its first turn.

A prior is fitted offline on a replay trace where the model really answered every prompt (scripts/fit_prior.py)
and kept in policy/priors/<GGUF SHA-256>.npz: the weights of MESS+'s head for that model (hashed n-grams and
dense features, messplus.DIM) and of its ConfidenceHead. A model without a prior starts from the task priors
and learns, as before. The GGUF is hashed only when a prior of exactly its size exists. A prior fitted by
the user on their own questions goes to <state dir>/priors (USER_PRIORS), read before the shipped ones and
kept across upgrades of the package.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from locod.daemon.regular_file import read_regular, written_whole
from locod.policy.confidence import WEIGHT_LIMIT, bounded, loadable

log = logging.getLogger(__name__)

PRIORS = Path(__file__).resolve().parent / "priors"
MAX_PRIOR_BYTES = 4 << 20  # a prior is ~13 kB: anything far bigger is not one save_prior wrote
USER_PRIORS = "priors"  # under the state directory: the user's own, read first


@dataclass(frozen=True)
class Prior:
    sha256: str
    gguf_size: int
    weights: np.ndarray  # MESS+'s head, messplus.DIM
    confidence: np.ndarray  # ConfidenceHead's weights
    source: str  # the trace and split it was fitted on
    path: Path | None = None  # the file it was read from

    @property
    def shipped(self) -> bool:
        """Shipped with locod (policy/priors), not fitted by the user on their own questions."""
        return self.path is not None and self.path.parent == PRIORS


def save_prior(prior: Prior, folder: Path = PRIORS) -> Path:
    """Write ``prior`` into ``folder`` whole or not at all: refitting over a good prior (scripts/fit_prior.py)
    and cut short by a crash, a power loss or a full disk, it leaves the good one, not a damaged one."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{prior.sha256}.npz"
    # <sha>.npz.tmp is no *.npz a reader takes for a prior; 0666 less the umask, as before: a service reads it
    with written_whole(path, mode=0o666) as f:
        np.savez_compressed(
            f,
            sha256=np.array(prior.sha256),
            gguf_size=np.array(prior.gguf_size),
            weights=prior.weights.astype(np.float32),
            confidence=prior.confidence.astype(np.float32),
            source=np.array(prior.source),
        )
    return path


def read_prior(path: Path) -> Prior:
    """Read as a regular file only: np.load would open a FIFO named ``*.npz`` and wait for a writer for good.
    A file that is no prior, or a damaged one, raises ValueError: numpy, zipfile and zlib each raise their own
    types for damaged bytes (zlib.error, EOFError, NotImplementedError, TypeError), and one of those in the
    user's priors folder stopped every start with a traceback."""
    raw = read_regular(path, MAX_PRIOR_BYTES)
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as data:
            return Prior(
                str(data["sha256"]),
                int(data["gguf_size"]),
                data["weights"].astype(np.float64),
                data["confidence"].astype(np.float64),
                str(data["source"]),
                path,
            )
    except Exception as exc:  # whatever the damage raised: the caller names the file and leaves it out
        raise ValueError(f"not a prior file, or a damaged one ({exc})") from None


def load_prior(gguf: Path, folder: Path = PRIORS, dim: int | None = None) -> Prior | None:
    """The prior in ``folder`` for this GGUF file, or None (no prior of its size and hash, or an unusable one)."""
    try:
        size = gguf.stat().st_size
    except OSError:  # a model whose file is not there or not readable: routing says so, once (daemon/modelfile.py)
        return None
    sized = [p for p in _readable_priors(folder) if p.gguf_size == size]
    if not sized:
        return None
    try:
        stat = gguf.stat()
        sha = _sha256_of_version(str(gguf.resolve()), stat.st_size, stat.st_mtime_ns)
    except OSError:  # there, but not readable by the daemon's user (a service's): as above
        return None
    for prior in (p for p in sized if p.sha256 == sha):
        shapes = (dim is None or prior.weights.shape == (dim,)) and loadable(prior.confidence)
        if shapes and bounded(prior.weights) and bounded(prior.confidence):
            return prior
        # a user's prior is kept across upgrades: one fitted for another version's heads is left out by name
        log.warning(
            "predictor prior %s for %s is unusable (weights %s, confidence %s; this locod's are %s and "
            "loadable ones, finite and within %g): it was fitted for another version of locod, or damaged; fit "
            "it again with scripts/fit_prior.py",
            prior.path,
            gguf.name,
            prior.weights.shape,
            prior.confidence.shape,
            dim,
            WEIGHT_LIMIT,
        )
    return None


def _readable_priors(folder: Path) -> list[Prior]:
    """The priors in ``folder``; one that cannot be read is left out by name, not every one with it."""
    try:
        paths = sorted(folder.glob("*.npz"))
    except OSError as exc:
        log.warning("no predictor priors from %s: %s", folder, exc)
        return []
    priors = []
    for path in paths:
        try:
            priors.append(read_prior(path))
        except (OSError, ValueError) as exc:
            log.warning("predictor prior %s is unreadable, left out: %s", path, exc)
    return priors


@functools.lru_cache(maxsize=16)
def _sha256_of_version(path: str, size: int, mtime_ns: int) -> str:
    """A model file's hash, once per version of the file: every daemon reload looks its prior up again, and
    hashing a 100 MB-8 GB GGUF each time would stall the reload for seconds."""
    return file_sha256(Path(path))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fit_logistic(x: np.ndarray, y: np.ndarray, start: np.ndarray, l2: float = 1e-3, steps: int = 400) -> np.ndarray:
    """Weights minimising the mean log-loss + l2 / 2 * |w - start|^2 (full-batch Adam): pulled towards
    ``start`` (the cold prior), so what few examples say about a feature does not run away with it."""
    w, m, v = start.astype(np.float64).copy(), np.zeros_like(start), np.zeros_like(start)
    for step in range(1, steps + 1):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30, 30)))
        grad = x.T @ (p - y) / len(y) + l2 * (w - start)
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad * grad
        w -= 0.05 * (m / (1 - 0.9**step)) / (np.sqrt(v / (1 - 0.999**step)) + 1e-8)
    return w
