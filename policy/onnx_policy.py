"""The TMO policy at run time: an ONNX file checked against the observation layout, run by onnxruntime.

Everything about the file is checked before it is used: it is a regular file, it loads, its metadata names
the layout version, K, Z, sizes and feature names (where it records them) this daemon builds, its inputs and
outputs have the expected names and declared shapes, and it runs: the graph is run on probe observations and
what it computes must have the shape [1, N_ACTIONS] and be finite (a graph may declare one shape and compute
another), finite log-probabilities (the allowed actions' probabilities sum to 1), within MAX_DECIDE_MS at
the fastest (a decision takes well under a millisecond; a Loop node can take for ever, so every run is
stopped after RUN_LIMIT_S: a probe's at start and at a reload, and a turn's). Any mismatch is a PolicyError
naming the file and the problem; the router then decides with MESS+ alone. The probes' features are 0 and
0.5, a real turn's one-hot ones 1: a graph may misbehave on real observations only. A failure at run time
(onnxruntime raises its own RuntimeErrors, the values are no log-probabilities, the run is stopped) is a
PolicyError too: that turn is decided by MESS+.

A policy of an older layout (one a user trained before the layout grew) still runs, on the features its
layout had: it loads with one warning that it does not see what was added (the local queue's wait for
version 1), and `locod policy train` makes one that does.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort

from locod.daemon.regular_file import read_regular, regular_size
from locod.errors import PolicyError, first_line
from locod.policy.observation import FEATURE_NAMES, LAYOUT_VERSION, N_ACTIONS, OBS_DIM, K, Z, layout_features

log = logging.getLogger(__name__)

DEFAULT_POLICY = Path(__file__).resolve().parent / "default" / "policy.onnx"
MAX_POLICY_BYTES = 64 << 20  # the shipped policy is ~100 kB; a bigger file is not one `locod policy train` wrote
# Entries of a policy's graphs (nodes, initializers, inputs, value infos; the shipped one has 21): onnxruntime
# takes about a millisecond for each as it loads, on the serving loop, and a 1.7 MB file of 100,000 unused
# initializers held it 111 s (the service's watchdog restarts a loop silent for 30 s), logging a line for each
MAX_GRAPH_ENTRIES = 2000
RUN_LIMIT_S = 1.0  # a run still going after this is stopped: at a probe the file is refused, at a turn MESS+ decides
PROBE_ROUNDS = 3  # each probe observation is run this many times: the fastest run is the policy's speed
MAX_DECIDE_MS = 5.0  # the shipped policy decides in about 10 us; a file this much slower is not one to route by
EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"  # onnxruntime's key
ENV_ALLOCATORS = "session.use_env_allocators"  # onnxruntime's key: a session allocates from the arena registered
# What the tensors of every policy's runs may take at once (the weights are held apart from it): a trained
# policy's run takes kilobytes, and a 2 kB graph that expands one number to 250 million took 1 GiB at each
# decision, which onnxruntime's arena then kept; one to billions would take the machine's memory.
RUN_ARENA_BYTES = MAX_POLICY_BYTES
SUM_TOLERANCE = 1e-3  # how far from 1 the allowed actions' probabilities may sum (float32 rounding)

T = TypeVar("T")


@functools.cache
def _bounded_arena() -> None:
    """Register, once per process, the arena of RUN_ARENA_BYTES every policy session runs in: a tensor past it
    fails its run (a PolicyError naming the policy) instead of being allocated."""
    cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(cpu, ort.OrtArenaCfg(RUN_ARENA_BYTES, -1, -1, -1))


class _Watchdog:
    """One thread that stops each armed onnxruntime run past its deadline (``RunOptions.terminate``): a
    Timer per run would start a thread for every turn's decision. It is woken only when a run's deadline
    comes before the one it waits for (none: idle), so a decision does not pay a thread switch (8x its time)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._armed: dict[int, tuple[float, ort.RunOptions]] = {}
        self._thread: threading.Thread | None = None
        self._wakes_at: float | None = None  # the deadline the thread waits for; None: none

    @contextmanager
    def limit(self, options: ort.RunOptions, seconds: float) -> Iterator[None]:
        """Within the block, the run given ``options`` is stopped once ``seconds`` have passed."""
        deadline = time.monotonic() + seconds
        with self._changed:
            self._armed[id(options)] = (deadline, options)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="policy-watchdog", daemon=True)
                self._thread.start()
            if self._wakes_at is None or deadline < self._wakes_at:
                self._wakes_at = deadline
                self._changed.notify()
        try:
            yield
        finally:
            with self._changed:
                del self._armed[id(options)]

    def _watch(self) -> None:
        with self._changed:
            while True:
                now = time.monotonic()
                for deadline, options in self._armed.values():
                    if deadline <= now:
                        options.terminate = True
                self._wakes_at = min((d for d, _ in self._armed.values() if d > now), default=None)
                self._changed.wait(None if self._wakes_at is None else self._wakes_at - now)


WATCHDOG = _Watchdog()


def _fault(values: list[float], allowed: list[bool]) -> str | None:
    """What makes ``values`` no log-probabilities over the allowed actions; None when they are. A value above 0
    is a probability over 1, and past 709 the record's ``math.exp`` of it overflowed and failed the turn."""
    kept = [v for v, a in zip(values, allowed) if a]
    if not all(math.isfinite(v) for v in kept):
        return "non-finite log-probabilities"
    total = sum(math.exp(min(v, 1.0)) for v in kept)  # capped: one value over 1 is refused all the same
    if abs(total - 1.0) > SUM_TOLERANCE:
        return (
            f"values that are not log-probabilities (the allowed actions' probabilities sum to {total:.3g}, "
            f"the highest log-probability is {max(kept):.3g})"
        )
    return None


def _session(path: Path) -> ort.InferenceSession:
    """The policy file as an onnxruntime session, or a PolicyError that names what is wrong with it."""
    try:
        model = read_regular(path, MAX_POLICY_BYTES)  # never a FIFO that would hold the loop in open()
    except FileNotFoundError:
        raise PolicyError(f"policy file {path} not found", code="policy_missing") from None
    except OSError as exc:
        raise PolicyError(f"policy file {path}: {exc.strerror or exc}", code="policy_corrupt") from None
    _check_side_files(path, model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # a 10 us graph: threads would cost more than they save
    options.inter_op_num_threads = 1
    # Loaded from bytes, a file whose weights are in a side file (ONNX external data) had it looked for in
    # the working directory: under systemd (cwd /) it was not found. It is beside the file that names it: a
    # symlink's target (a policy chosen by a link to one of its versions), where onnxruntime confines it.
    options.add_session_config_entry(EXTERNAL_DATA_FOLDER, str(path.resolve().parent))
    _bounded_arena()
    options.add_session_config_entry(ENV_ALLOCATORS, "1")
    try:
        # Constant folding computes a graph's constant parts as it loads, outside any arena: a graph that
        # expands a constant to 250 million numbers took 2 GiB and 8 s at load. Left to the run, the
        # arena bounds it (a trained policy decides as fast without it).
        return ort.InferenceSession(
            model, options, providers=["CPUExecutionProvider"], disabled_optimizers=["ConstantFolding"]
        )
    except Exception as exc:  # onnxruntime raises its own exception types for every kind of bad file
        raise PolicyError(f"policy file {path} is not a loadable ONNX model: {exc}", code="policy_corrupt") from None


def _check_side_files(path: Path, model: bytes) -> None:
    """The graphs of ``model`` within MAX_GRAPH_ENTRIES, and the files it keeps its weights in (ONNX external
    data) bounded as the policy file is: the policy and they together within MAX_POLICY_BYTES, each a regular
    file. onnxruntime reads them whole, with no bound: a 125-byte policy naming a 512 MiB side file took 1 GiB
    at load, on the serving loop."""
    try:
        if _too_many_entries(memoryview(model)):
            raise PolicyError(
                f"policy file {path} has more than {MAX_GRAPH_ENTRIES} nodes, initializers and value infos in its "
                "graphs: onnxruntime would take minutes to load it; not a policy `locod policy train` wrote",
                code="policy_corrupt",
            )
        names = sorted(set(_external_data(memoryview(model))))
    except (ValueError, IndexError):  # not the protobuf an ONNX model is
        raise PolicyError(f"policy file {path} is not a loadable ONNX model", code="policy_corrupt") from None
    total = len(model)
    for name in names:
        side = path.resolve().parent / name  # where onnxruntime looks for it (_session)
        try:
            total += regular_size(side, MAX_POLICY_BYTES)
        except OSError as exc:
            raise PolicyError(
                f"policy file {path}: its external data file {side}: {exc.strerror or exc}", code="policy_corrupt"
            ) from None
    if total > MAX_POLICY_BYTES:
        raise PolicyError(
            f"policy file {path} and its external data files are {total} bytes together, over {MAX_POLICY_BYTES}: "
            "not a policy `locod policy train` wrote",
            code="policy_corrupt",
        )


# protobuf's own parsers refuse messages nested deeper than 100 (onnxruntime's too); a policy file nested
# thousands deep would stop this walk with RecursionError, not a PolicyError naming the file
_MAX_DEPTH = 100
_FIXED_BYTES = {1: 8, 5: 4}  # protobuf's fixed-width wire types: 64 and 32 bits
# The protobuf fields of ONNX's messages (onnx.proto) that lead to a tensor, by the message they hold: a
# model's graph and functions, their nodes, initializers and attributes (a Constant's tensor, a subgraph).
_HOLDS = {
    "model": {7: "graph", 25: "function"},
    "function": {7: "node"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
    "entry": {},
}


def _messages(message: memoryview, kind: str = "model", depth: int = 0) -> Iterator[tuple[str, memoryview]]:
    """``message`` (a serialised ``kind``, ``depth`` messages down) and every message in it that may lead to
    a tensor, with its kind; as they are walked, so a reader that stops early stops the walk."""
    if depth > _MAX_DEPTH:
        raise ValueError(f"messages nested over {_MAX_DEPTH} deep")
    yield kind, message
    for number, value in _fields(message):
        held = _HOLDS[kind].get(number)
        if held is not None and isinstance(value, memoryview):
            yield from _messages(value, held, depth + 1)


def _external_data(model: memoryview) -> Iterator[str]:
    """The ``location`` of every tensor's external data in the serialised ``model``."""
    for kind, message in _messages(model):
        if kind == "entry":  # StringStringEntryProto: key 1, value 2
            entry = {number: bytes(value) for number, value in _fields(message) if isinstance(value, memoryview)}
            if entry.get(1) == b"location":
                yield entry.get(2, b"").decode("utf-8", "surrogateescape")


def _too_many_entries(model: memoryview) -> bool:
    """Whether the graphs and functions of the serialised ``model`` have more than MAX_GRAPH_ENTRIES entries
    (nodes, initializers, inputs, value infos ...) in all; counted up to one past it, not further."""
    entries = (
        number for kind, message in _messages(model) if kind in ("graph", "function") for number, _ in _fields(message)
    )
    return next(itertools.islice(entries, MAX_GRAPH_ENTRIES, None), None) is not None


def _fields(message: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) of a serialised protobuf message: an integer, or the bytes of a length-delimited
    field (a message, a string); fixed-width numbers are skipped. ValueError for what is not protobuf's wire
    format (groups, wire types 3 and 4, are in none of ONNX's messages)."""
    at = 0
    while at < len(message):
        key, at = _varint(message, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _varint(message, at)
            yield number, value
            continue
        size, at = _varint(message, at) if wire == 2 else (_FIXED_BYTES.get(wire, -1), at)
        if size < 0 or at + size > len(message):
            raise ValueError(f"wire type {wire} of {size} bytes at {at}")
        if wire == 2:
            yield number, message[at : at + size]
        at += size


def _varint(message: memoryview, at: int) -> tuple[int, int]:
    """The varint at ``at``, and where what follows it starts."""
    value = shift = 0
    while True:
        byte = message[at]  # IndexError past the end
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if byte < 0x80:
            return value, at
        if shift > 63:
            raise ValueError("a varint of over ten bytes")


def _refuse_newer_layout(path: Path, meta: dict[str, str]) -> None:
    """A file a newer locod trained (after a downgrade) is refused saying so, not only that its metadata differ."""
    layout = meta.get("locod.layout_version", "")
    if layout.isdigit() and int(layout) > LAYOUT_VERSION:
        raise PolicyError(
            f"policy file {path} has observation layout {layout}, newer than this locod knows ({LAYOUT_VERSION}): "
            "a newer locod made it; run that version (a daemon started before an upgrade: restart it), or make "
            "one for this version with `locod policy train`",
            code="policy_mismatch",
        )


def _stated_features(meta: dict[str, str]) -> tuple[str, ...] | None:
    """The feature names a file's ``locod.feature_names`` lists; None when it lists none: absent (a hand-made
    file), not JSON, or JSON that is no list (``5``, ``true``, which ``tuple()`` would raise TypeError on)."""
    try:
        stated = json.loads(meta.get("locod.feature_names", "null"))
    except ValueError:
        return None
    return tuple(stated) if isinstance(stated, list) else None


def _same_features(meta: dict[str, str]) -> bool:
    """Whether a file's ``locod.feature_names`` (absent from a hand-made file: nothing to check) name this
    layout's features in this order: the layout version is bumped when they change, and a file whose names
    differ under this version (TASKS reordered without a bump) would be read column for column all the same."""
    return "locod.feature_names" not in meta or _stated_features(meta) == FEATURE_NAMES


class OnnxPolicy:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.session = _session(path)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.columns = self._older_layout(meta)  # the columns of this layout's observation it reads; None: all
        layout, obs_dim = (
            (LAYOUT_VERSION, OBS_DIM) if self.columns is None else (meta["locod.layout_version"], len(self.columns))
        )
        expected = {
            "locod.layout_version": str(layout),
            "locod.k": str(K),
            "locod.z": str(Z),
            "locod.obs_dim": str(obs_dim),
            "locod.n_actions": str(N_ACTIONS),
        }
        _refuse_newer_layout(path, meta)
        for key, want in expected.items():
            if meta.get(key) != want:
                raise PolicyError(
                    f"policy file {path}: metadata {key} is {meta.get(key)!r}, this daemon needs {want!r}",
                    code="policy_mismatch",
                )
        if self.columns is None and not _same_features(meta):
            raise PolicyError(
                f"policy file {path}: its locod.feature_names are not this daemon's observation, in its order, "
                "although its layout version is: it would read one feature's column as another's; make one "
                "for this version with `locod policy train`",
                code="policy_mismatch",
            )
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        if (
            set(inputs) != {"observation", "mask"}
            or inputs["observation"][-1] != obs_dim
            or inputs["mask"][-1] != N_ACTIONS
            or outputs.get("log_probs", [None])[-1] != N_ACTIONS
        ):
            raise PolicyError(
                f"policy file {path}: inputs {inputs} and outputs {outputs} do not match "
                f"observation[{obs_dim}], mask[{N_ACTIONS}] -> log_probs[{N_ACTIONS}]",
                code="policy_mismatch",
            )
        self.version = meta.get("locod.policy_version", "unversioned")
        self.metadata = dict(meta)
        # Inputs and output are bound once to buffers of this object, so a call copies two small arrays in
        # and runs the graph instead of building feeds and converting outputs on every turn (about half the
        # time, docs/benchmarks.md). Not thread-safe; the router calls it under its lock.
        self._observation = np.zeros((1, obs_dim), dtype=np.float32)
        self._mask = np.zeros((1, N_ACTIONS), dtype=np.float32)
        self._log_probs = np.zeros((1, N_ACTIONS), dtype=np.float32)
        self._binding = self.session.io_binding()
        self._binding.bind_cpu_input("observation", self._observation)
        self._binding.bind_cpu_input("mask", self._mask)
        self._binding.bind_output("log_probs", "cpu", 0, np.float32, [1, N_ACTIONS], self._log_probs.ctypes.data)
        self._probe(obs_dim)

    def _probe(self, obs_dim: int) -> None:
        """Run the graph on valid observations (every action allowed, and the local one alone): what it
        computes must be [1, N_ACTIONS] and finite where allowed, or the file is refused now rather than
        failing every turn."""
        local_only = np.zeros((1, N_ACTIONS), dtype=np.float32)
        local_only[0, 0] = 1.0
        fastest = math.inf
        for fill, mask in ((0.0, np.ones((1, N_ACTIONS), dtype=np.float32)), (0.5, local_only)) * PROBE_ROUNDS:
            observation = np.full((1, obs_dim), fill, dtype=np.float32)
            out, took_ms = self._probe_run(observation, mask)
            fastest = min(fastest, took_ms)
            shape = getattr(out, "shape", None)
            if shape != (1, N_ACTIONS):
                raise PolicyError(
                    f"policy file {self.path} computes log_probs of shape {list(shape or [])} for one "
                    f"observation, not [1, {N_ACTIONS}]",
                    code="policy_mismatch",
                )
            fault = _fault(np.asarray(out, dtype=np.float64)[0].tolist(), mask[0].astype(bool).tolist())
            if fault:
                raise PolicyError(
                    f"policy file {self.path} returns {fault} on a valid observation", code="policy_output"
                )
        if fastest > MAX_DECIDE_MS:
            raise PolicyError(
                f"policy file {self.path} takes {fastest:.1f} ms to decide, over {MAX_DECIDE_MS:g} ms: a policy "
                "that `locod policy train` writes takes about 0.01 ms",
                code="policy_slow",
            )

    def _probe_run(self, observation: np.ndarray, mask: np.ndarray) -> tuple[Any, float]:
        """One run of the graph (what it computes, and in how many ms of this thread's CPU). CPU time, not
        wall time: with one thread each, onnxruntime runs the graph on this one, and a wall clock would count
        the wait for the GIL after it (up to the 5 ms switch interval with busy threads beside it), which
        refused the shipped policy on a loaded daemon about one load in ten."""
        started = time.thread_time()
        feeds = {"observation": observation, "mask": mask}
        (out,) = self._limited(
            lambda options: self.session.run(["log_probs"], feeds, options), f"policy file {self.path}"
        )
        return out, (time.thread_time() - started) * 1000

    @staticmethod
    def _limited(run: Callable[[ort.RunOptions], T], who: str) -> T:
        """``run`` given run options that stop it after RUN_LIMIT_S; what onnxruntime raises (a shape it
        cannot compute, a bad node, the stop) as a PolicyError naming ``who``."""
        options = ort.RunOptions()
        options.log_severity_level = 4  # fatal only: a stopped run's error line on stderr at every turn was a flood
        # -1: no graph capture (the CPU provider has none); said, because onnxruntime's Python looks the key up
        # on each run given options, and the exception an unset key raises made a decision 6 times slower
        options.add_run_config_entry("gpu_graph_id", "-1")
        try:
            with WATCHDOG.limit(options, RUN_LIMIT_S):
                return run(options)
        except Exception as exc:  # onnxruntime's own errors
            if options.terminate:
                raise PolicyError(
                    f"{who} was still deciding after {RUN_LIMIT_S:g} s and was stopped (a Loop that does not "
                    "end, or a graph far too large): a decision takes well under a millisecond",
                    code="policy_slow",
                ) from None
            raise PolicyError(f"{who} failed on a valid observation: {first_line(exc)}", code="policy_output") from None

    def _older_layout(self, meta: dict[str, str]) -> np.ndarray | None:
        """For a file of an older layout whose feature names are that layout's, the columns of this layout's
        observation it reads (and one warning); None otherwise (the checks that follow judge the file)."""
        version = meta.get("locod.layout_version", "")
        if not version.isdigit() or not 1 <= int(version) < LAYOUT_VERSION:
            return None
        names = layout_features(int(version))
        if _stated_features(meta) != names:
            return None
        missing = [name for name in FEATURE_NAMES if name not in names]
        log.warning(
            "policy file %s has observation layout %s (this daemon's is %d): it runs without %s; "
            "`locod policy train` makes one that sees them",
            self.path,
            version,
            LAYOUT_VERSION,
            ", ".join(missing),
        )
        return np.array([FEATURE_NAMES.index(name) for name in names], dtype=np.intp)

    def log_probs(self, observation: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """log pi(action | observation) for every action; masked ones are very negative."""
        self._observation[0] = observation if self.columns is None else observation[self.columns]
        self._mask[0] = mask
        who = f"policy {self.version}"
        self._limited(lambda options: self.session.run_with_iobinding(self._binding, options), who)
        result = self._log_probs[0].astype(np.float64)
        fault = _fault(result.tolist(), [bool(a) for a in self._mask[0].tolist()])
        if fault:
            raise PolicyError(f"{who} returned {fault}", code="policy_output")
        return result
