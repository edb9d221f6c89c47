"""Local answers through llama.cpp: a zoo of GGUF models, loaded on demand and kept within a memory budget.

Like Ollama's keep-alive, a model stays resident after use; when loading another would exceed the budget,
kept dialogue states (daemon/kvcache.py) are evicted first, then the least recently used models are
unloaded: models and dialogue states share the one budget. Only the thread holding the FairGate (a turn's
or the shadow lane's) touches the zoo's models, so loading and generating need no lock of their own.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Hashable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import jinja2
import llama_cpp
import numpy as np
import numpy.typing as npt
from llama_cpp import Llama, LogitsProcessorList, llama_chat_format

from locod.daemon.answer_grammar import answer_grammar
from locod.daemon.backends import Generation, Prompt
from locod.daemon.chat_shape import ChatShape, shape_of, write_bos
from locod.daemon.config import Config, LocalConfig, LocalModelConfig
from locod.daemon.fitting import fit_to_context, prompt_tokens
from locod.daemon.gate import FairGate
from locod.daemon.gguf import NotGGUF, kv_bytes_per_token, read_metadata
from locod.daemon.heap import release_free_memory
from locod.daemon.kvcache import DialogueCache
from locod.daemon.kvpark import DiskPark
from locod.daemon.logprobs import TokenLogprobs
from locod.daemon.logs import Throttle
from locod.daemon.modelfile import check_model_file, fingerprint, resolve_path
from locod.daemon.prompt_reading import PromptReading, PromptStopped, StoppedReadings
from locod.daemon.regular_file import file_stamp
from locod.daemon.sessions import door_of
from locod.daemon.telemetry import mem_available_mb
from locod.daemon.template_deadline import TEMPLATE_FAILURES, deadline
from locod.errors import MODEL_RELOADED, Busy, ConfigError, ModelError, first_line
from locod.policy.load import TurnTime

log = logging.getLogger(__name__)

# local.cache_mb = -1: keep this many full-context dialogue states, within a quarter of the free memory.
AUTO_CACHE_DIALOGUES = 8
# A turn that gives no temperature: the device's own, as a cloud endpoint applies its own (OpenAI's 1.0).
DEVICE_TEMPERATURE = 0.7
TEMPLATE_DEADLINE_S = 2.0  # a chat template renders in a millisecond or so; one still going is stopped


class SampledTokens:
    """A llama.cpp logits processor that counts the tokens sampled, changing nothing. The streamed pieces of
    text are no count of tokens: one piece may hold several (a character of several bytes, text held back
    while it may begin a stop string), and an answer cut at ``max_tokens`` read as shorter than its limit,
    so the HTTP door said it finished for ``stop`` and its usage counted too few tokens."""

    def __init__(self) -> None:
        self.sampled = 0

    def __call__(self, input_ids: npt.NDArray[np.intc], logits: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
        self.sampled += 1
        return logits

    def answer_tokens(self, finish: str | None, max_tokens: int) -> int:
        """The answer's tokens, by llama.cpp's ``finish`` reason: one that ended itself (``stop``) sampled its
        end-of-generation token last, which is not part of it; one ended by a stop string sampled the token
        that completed the stop string last, not counted either (the stop string's earlier tokens, when it
        took several, are). Never more than ``max_tokens``, as OpenAI's usage: llama.cpp samples one past it
        when the last one leaves a character of several bytes unfinished."""
        return min(self.sampled - 1 if finish == "stop" else self.sampled, max_tokens)


@dataclass(frozen=True)
class Opened:
    """A stream to read: when reading began, its tokens' count, and their log-probs if asked for."""

    stream: Generator[Any, None, None]
    started: float
    sampled: SampledTokens
    logprobs: TokenLogprobs | None


class AnswerStream:
    """A local answer's text as it streams: passed on at once, or, with a checkpoint, held back until the
    checkpoint has judged it (at its token count, or at the end of a shorter answer)."""

    def __init__(self, prompt: Prompt, llm: Llama, logprobs: TokenLogprobs | None) -> None:
        self.prompt, self.llm, self.logprobs = prompt, llm, logprobs
        self.parts: list[str] = []
        self.first: float | None = None  # the model's first token
        self.shown: float | None = None  # the first text passed on
        self.held = prompt.checkpoint is not None
        self.escalated = False

    def add(self, delta: str) -> bool:
        """Take one token's text; False when the checkpoint escalated the turn."""
        self.first = self.first or time.perf_counter()
        self.parts.append(delta)
        checkpoint = self.prompt.checkpoint
        if not self.held:
            self._show(delta)
        elif checkpoint is not None and len(self.parts) >= checkpoint.tokens:
            return self._judge()
        return True

    def end(self) -> None:
        """The answer is complete: one shorter than the checkpoint is judged now."""
        if self.held:
            self._judge()

    def scored(self) -> tuple[tuple[str, ...], tuple[float, ...]]:
        """The answer's tokens and their log-probs so far, when they are read (else empty)."""
        if self.logprobs is None:
            return (), ()
        read = self.logprobs.tokens()
        pieces = tuple(self.llm.detokenize([t]).decode("utf-8", errors="ignore") for t, _ in read)
        return pieces, tuple(lp for _, lp in read)

    def _judge(self) -> bool:
        assert self.prompt.checkpoint is not None
        self.held = False
        kept = self.prompt.checkpoint.keep(*self.scored())
        if self.logprobs is not None and not self.prompt.logprobs:
            self.logprobs.stop()  # judged: the rest of the answer is read by nobody
        if kept:
            self._show("".join(self.parts))
            return True
        self.escalated = True
        return False

    def _show(self, text: str) -> None:
        self.shown = self.shown or time.perf_counter()
        self.prompt.on_delta(text)


@dataclass
class LoadedModel:
    """A local model in memory, with what the zoo counts (its footprint, its last use) and checks it by."""

    config: LocalModelConfig
    llm: Llama
    footprint_mb: float
    last_used: float
    stamp: tuple[int, int] | None  # the file's size and mtime when it was read: a reload sees it replaced
    identity: str  # what its dialogue states are parked under and must match to be restored (ModelZoo.identity)
    shape: ChatShape  # what its chat template refuses, and its end of turn: each turn's messages are shaped to it


def check_chat_formats(config: Config) -> None:
    """Refuse, at start and at a reload, a ``chat_format`` llama-cpp-python does not know: the config's
    schema cannot list them without importing llama.cpp, and the model would otherwise fail each of its
    turns with llama.cpp's exception as an internal error. ``chat_template.<name>`` names a template in
    the GGUF's own metadata, which only the loaded model can tell: those pass."""
    registry = llama_chat_format.LlamaChatCompletionHandlerRegistry()
    for model in config.local.models:
        if model.chat_format is None or model.chat_format.startswith("chat_template."):
            continue
        try:
            registry.get_chat_completion_handler_by_name(model.chat_format)
        except llama_chat_format.LlamaChatCompletionHandlerNotFoundException as exc:
            raise ConfigError(
                f"{config.source}: local model {model.name!r}: chat_format {model.chat_format!r} is not one "
                f"llama-cpp-python knows ({exc}); leave it out to use the GGUF's own chat template"
            ) from None


class ModelZoo:
    """The local models, loaded on demand within local.memory_budget_mb, and the dialogue states (``cache``)
    that share that budget."""

    def __init__(
        self,
        models: list[LocalModelConfig],
        models_dir: Path,
        budget_mb: int,
        n_threads: int,
        cache_mb: int = -1,
        park: DiskPark | None = None,
        procfs: Path | None = None,
    ) -> None:
        """``cache_mb``: dialogue states kept in memory (-1: sized from the first model loaded and the free
        memory; 0: none); ``park``: where evicted states go, if anywhere; ``procfs``: where the memory the
        system has left is read before each load (telemetry.procfs_root), None: not read."""
        self.models = {m.name: m for m in models}
        self.procfs = procfs
        self._short_of_memory: dict[str, float] = {}  # model -> the MiB a refused load of it needed
        self.models_dir = models_dir
        self.budget_mb = budget_mb
        self.n_threads = n_threads or None
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._cache_auto = cache_mb < 0
        self._said: set[tuple[str, str]] = set()  # (model, what) of the misfits logged: each is said once
        self._recheck_files = False  # set by a reload: the next get unloads models whose file was replaced
        self.cache = DialogueCache(max(cache_mb, 0), self._room_mb, park, self.identity)

    @classmethod
    def configured(cls, config: Config) -> ModelZoo:
        """The zoo of ``config``'s local models, its dialogue states parked on disk with local.cache_disk_mb."""
        local = config.local
        park = DiskPark.opened(config.state_dir / "kvcache", local.cache_disk_mb << 20) if local.cache_disk_mb else None
        procfs = Path(config.telemetry.procfs_root)
        return cls(
            local.models, config.models_dir, local.memory_budget_mb, local.n_threads, local.cache_mb, park, procfs
        )

    def reconfigure(self, local: LocalConfig) -> list[str]:
        """Take the models of a reloaded config, and say what changed in them. Called on the serving loop,
        not under the gate, so it only swaps the table; the gate's next holder unloads what was removed or
        changed, or whose file was replaced, at its ``get``."""
        changes = model_changes(self.models, {m.name: m for m in local.models})
        if changes:
            log.info("reload: local models %s", "; ".join(changes))
        self.models = {m.name: m for m in local.models}
        self._short_of_memory.clear()  # a changed n_ctx or file needs another amount: asked again at a load
        self.budget_mb = local.memory_budget_mb
        self.n_threads = local.n_threads or None
        self._recheck_files = True
        if local.cache_mb >= 0:  # -1 keeps the size chosen at the first load
            self.cache.limit_mb = local.cache_mb
        return changes

    def get(self, name: str) -> LoadedModel:
        """The model ``name``, loaded within the budget if it is not resident; first unloads the models a
        reload removed or changed, or whose file was replaced since it was read.

        A turn names a model of the configuration it was decided under, so one that is not here was removed by
        a reload while the turn waited: ``Busy`` (retryable) rather than a fault of the daemon's, as the same
        request sent again is decided under the configuration now running (another model, or the refusal of
        an unknown name)."""
        models = self.models
        if name not in models:
            raise Busy(
                f"the local model {name!r} was removed by a reload of the configuration while this turn waited "
                "for it; send the request again",
                code=MODEL_RELOADED,
            )
        replaced = self._replaced_files() if self._recheck_files else set()
        self._recheck_files = False
        for stale in [n for n, m in self._loaded.items() if models.get(n) != m.config or n in replaced]:
            self._loaded.pop(stale).llm.close()
            self.cache.drop_model(stale)  # states of another file or context are no use, and unsafe
            release_free_memory()
            why = "its file was replaced" if stale in replaced else "the reloaded config removed or changed it"
            log.info("unloaded local model %s: %s", stale, why)
        loaded = self._loaded.get(name)
        if loaded is None:
            loaded = self._load(models[name])
        self._loaded.move_to_end(name)
        loaded.last_used = time.monotonic()
        return loaded

    def _replaced_files(self) -> set[str]:
        """Loaded models whose file is no longer the one read (a new quantisation copied over it): the copy
        in memory (no mmap) would answer on with the old weights until a restart."""
        return {
            name
            for name, loaded in self._loaded.items()
            if file_stamp(resolve_path(loaded.config, self.models_dir)) != loaded.stamp
        }

    def identity(self, name: str) -> str:
        """What a parked dialogue state of this model must match: the weights in memory (the fingerprint of
        the file as it was loaded, not as it is now: one copied over it since holds other weights), the
        context and the llama.cpp build; "" for a model not loaded. A kept state lives only while its model
        is loaded (states are evicted before a model is unloaded for room, and dropped with one unloaded for
        a changed config or file), so the loaded model's identity is the one of the weights that made it."""
        loaded = self._loaded.get(name)
        return "" if loaded is None else loaded.identity

    def _load(self, model: LocalModelConfig) -> LoadedModel:
        path = check_model_file(model, self.models_dir)
        stamp = file_stamp(path)
        weights_mb = path.stat().st_size / 2**20
        # Room for the weights and the KV cache its n_ctx takes (the header says how big), before loading it:
        # the weights alone let a long-context model push the resident set past the budget.
        needed_mb = weights_mb + _header_kv_mb(path, model.n_ctx)
        self._check_memory(model, needed_mb)  # before making room: a refused load unloads no other model
        self._make_room(needed_mb)
        started = time.perf_counter()
        identity, llm = self._read(model, path)
        kv_mb = kv_cache_mb(llm.metadata, llm.n_ctx())
        loaded = LoadedModel(model, llm, weights_mb + kv_mb, time.monotonic(), stamp, identity, _shape(llm))
        self._loaded[model.name] = loaded
        self._warn_misfit(loaded)
        self._warn_template(loaded)
        if self._cache_auto:
            self._cache_auto = False
            self.cache.limit_mb = auto_cache_mb(kv_mb, self._room_mb())
        log.info(
            "loaded local model %s (%.0f MiB resident estimate) in %.1f s; dialogue cache %.0f MiB",
            model.name,
            loaded.footprint_mb,
            time.perf_counter() - started,
            self.cache.limit_mb,
        )
        return loaded

    def _read(self, model: LocalModelConfig, path: Path) -> tuple[str, Llama]:
        """The weights in ``path`` as llama.cpp loads them, with their identity (what their dialogue states
        are parked under: ``identity``); a ModelError (``model_corrupt``) says what is wrong with the file."""
        try:
            identity = f"{model.name}:{fingerprint(path)}:{model.n_ctx}:{llama_cpp.__version__}"
            llm = Llama(
                model_path=str(path),
                n_ctx=model.n_ctx,
                n_gpu_layers=model.n_gpu_layers,
                n_threads=self.n_threads,
                n_threads_batch=self.n_threads,  # prompt processing too: a thread cap must cap both pools
                chat_format=model.chat_format,
                # Read into memory, not mapped: a mapped file truncated or overwritten in place (`cp`, a
                # download over it) kills the whole daemon with SIGBUS on the next token.
                use_mmap=False,
                verbose=False,
            )
        except (jinja2.TemplateError, SyntaxError, RecursionError) as exc:  # llama-cpp-python compiles every
            # chat template the GGUF holds as it loads, the one chat_format replaces too, into Python code (whose
            # limits, 100 nested blocks or deep parentheses, are SyntaxError and RecursionError): nothing else
            # in the load compiles or recurses, and no setting here gets past it
            raise ModelError(
                f"model {model.name!r}: a chat template in {path} (tokenizer.chat_template*) is not valid Jinja: "
                f"{first_line(exc)}; llama-cpp-python compiles it whatever chat_format says: use another file "
                "of the model, or rewrite its template (gguf's gguf_new_metadata.py --chat-template)",
                code="model_corrupt",
            ) from None
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelError(
                f"model {model.name!r}: llama.cpp could not load {path}: {exc}{_address_space_note()}",
                code="model_corrupt",
            ) from None
        except MemoryError as exc:  # llama-cpp-python's own arrays (its logits) past an address-space limit:
            # the start ended in numpy's traceback
            raise ModelError(
                f"model {model.name!r}: llama.cpp could not load {path}: out of memory ({exc}){_address_space_note()}",
                code="model_too_large",
            ) from None
        _check_template_named(model, path, llm)
        if model.chat_format is None and "chat_template.default" in llm._chat_handlers:
            # the GGUF's own template, as chat_format's doc says: llama-cpp-python put a built-in format in its
            # place when it knew the template, and its Mistral one drops the system message and runs two user
            # messages together, where the template's refusal is folded (daemon/chat_shape.py)
            llm.chat_format = "chat_template.default"
        return identity, llm

    def _check_memory(self, model: LocalModelConfig, needed_mb: float) -> None:
        """Refuse a load the system's memory cannot hold: llama.cpp allocates the whole KV cache at once, and
        past the memory there is, the OOM killer ends the daemon and every turn in it (a reload to n_ctx =
        1048576 did). One model alone may exceed local.memory_budget_mb (``_warn_misfit``), not the memory.
        A model offloaded to a GPU is not checked: its layers and their cache take the GPU's memory instead.
        The loaded models count as available: making room unloads them (when room was made before this
        check, a refused load had unloaded the model that was answering, for nothing)."""
        if self.procfs is None or (model.n_gpu_layers and llama_cpp.llama_supports_gpu_offload()):
            return
        free_mb = mem_available_mb(self.procfs)
        if free_mb is None:
            return
        resident_mb = self.resident_mb()
        if needed_mb > free_mb + resident_mb:
            self._short_of_memory[model.name] = needed_mb
            freeable = f" ({free_mb + resident_mb:.0f} with the loaded models unloaded)" if resident_mb else ""
            raise ModelError(
                f"model {model.name!r} needs about {needed_mb:.0f} MiB (its weights and a {model.n_ctx}-token KV "
                f"cache), but {free_mb:.0f} MiB of memory is available{freeable}: lower its n_ctx, or use a "
                "smaller quantisation",
                code="model_too_large",
            )

    def short_of_memory(self) -> set[str]:
        """The models a load was refused for (``model_too_large``) that the memory still cannot hold: routing
        passes them by rather than picking one to fail each turn, and offers them again once there is room
        (one read of meminfo a turn, only while a refusal is remembered)."""
        if not self._short_of_memory or self.procfs is None:
            return set()
        free_mb = mem_available_mb(self.procfs)
        if free_mb is None:
            return set()
        room_mb = free_mb + self.resident_mb()
        return {name for name, needed_mb in list(self._short_of_memory.items()) if needed_mb > room_mb}

    def _warn_misfit(self, loaded: LoadedModel) -> None:
        """Say what about a loaded model its settings get wrong, which the operator would otherwise find out
        from its speed, the OOM killer or its answers."""
        model, llm = loaded.config, loaded.llm
        arch = llm.metadata.get("general.architecture", "")
        try:
            trained = int(llm.metadata.get(f"{arch}.context_length", 0))  # llama.cpp gives the header's text
        except ValueError:
            trained = 0
        # Each said once per model (and budget or context), not at each load after an eviction.
        if model.n_gpu_layers and not llama_cpp.llama_supports_gpu_offload() and self._first(model.name, "gpu"):
            # PyPI's source build is CPU-only unless built with CMAKE_ARGS="-DGGML_CUDA=on": on a Jetson the
            # setting then does nothing.
            log.warning(
                "local model %s: n_gpu_layers = %d, but this llama-cpp-python build has no GPU offload: it runs on "
                "the CPU (docs/operations.md, Several models on a small device)",
                model.name,
                model.n_gpu_layers,
            )
        if loaded.footprint_mb > self.budget_mb and self._first(model.name, f"budget {self.budget_mb}"):
            log.warning(
                "local model %s takes about %.0f MiB (weights and a %d-token KV cache), more than "
                "local.memory_budget_mb (%d MiB): it runs alone, over the budget; raise the budget if the device "
                "has the memory, else lower its n_ctx or use a smaller quantisation",
                model.name,
                loaded.footprint_mb,
                llm.n_ctx(),
                self.budget_mb,
            )
        if 0 < trained < llm.n_ctx() and self._first(model.name, f"n_ctx {llm.n_ctx()}"):
            log.warning(
                "local model %s: n_ctx = %d is beyond the %d tokens it was trained for: past those its answers "
                "may fall apart (llama.cpp does not stop it); set n_ctx to at most %d",
                model.name,
                llm.n_ctx(),
                trained,
                trained,
            )

    def _warn_template(self, loaded: LoadedModel) -> None:
        """Say what the model's chat template refuses (the operator's answer to "where did my system prompt
        go"), and that a GGUF without one is given Llama 2's format, which only Llama 2 models were trained on."""
        model = loaded.config
        if not self._first(model.name, "template"):
            return
        for refusal in loaded.shape.refusals():
            log.info("local model %s: its chat template refuses %s", model.name, refusal)
        if model.chat_format is None and "tokenizer.chat_template" not in loaded.llm.metadata:
            log.warning(
                "local model %s: %s has no chat template (tokenizer.chat_template), so its prompts are written "
                "in Llama 2's [INST] format: a base model continues them as text, and a chat model of another "
                "family needs chat_format set to its own (chatml, gemma, mistral-instruct, ...; "
                "docs/configuration.md, Bringing your own GGUF)",
                model.name,
                resolve_path(model, self.models_dir),
            )

    def _first(self, model: str, what: str) -> bool:
        """True the first time ``what`` is said of ``model``."""
        fresh = (model, what) not in self._said
        self._said.add((model, what))
        return fresh

    def _room_mb(self) -> float:
        """What the budget leaves beside the loaded models; the dialogue cache's status asks it from the
        serving loop, while a turn may load or unload one."""
        return self.budget_mb - self.resident_mb()

    def _make_room(self, needed_mb: float) -> None:
        """Kept dialogue states go first (they are cheap to rebuild), then least recently used models."""
        while self.resident_mb() + self.cache.mb + needed_mb > self.budget_mb:
            if self.cache.evict_oldest():
                continue
            if not self._loaded:
                return
            name, old = next(iter(self._loaded.items()))
            self.cache.forget_live(name, old.llm)  # parked as any evicted state, while its identity is known
            del self._loaded[name]
            old.llm.close()
            release_free_memory()  # its weights' pages, else kept by the loading thread's arena
            log.info("unloaded local model %s to stay within %d MiB", name, self.budget_mb)

    def resident(self) -> list[str]:
        return list(self._loaded)

    def resident_mb(self) -> float:
        """The loaded models' estimated memory (weights and KV caches), against ``budget_mb``. Asked from the
        serving loop while a turn may load or unload one: a snapshot (list() runs in C, under the GIL)."""
        return sum(m.footprint_mb for m in list(self._loaded.values()))

    def close(self) -> None:
        """Unload everything; with a disk park, the dialogues' states are parked first (while their models'
        identities are known), the live ones last: the park's trim keeps the most recently written."""
        self.cache.park_all()
        for name, loaded in self._loaded.items():
            self.cache.forget_live(name, loaded.llm)
            loaded.llm.close()
        self._loaded.clear()


def _check_template_named(model: LocalModelConfig, path: Path, llm: Llama) -> None:
    """Refuse a ``chat_format = "chat_template.NAME"`` the GGUF holds no template of: only the loaded file
    can tell (``check_chat_formats`` lets these pass), and each of its turns failed with llama-cpp-python's
    exception as an internal error."""
    named = model.chat_format or ""
    if not named.startswith("chat_template.") or named in llm._chat_handlers:
        return
    held = ", ".join(sorted(n for n in llm._chat_handlers if n.startswith("chat_template."))) or "none"
    llm.close()
    raise ConfigError(
        f"local model {model.name!r}: chat_format = {named!r}, but {path} holds no such template (it holds: "
        f"{held}); set chat_format to one it holds, or leave it out to use the GGUF's own"
    )


def _shape(llm: Llama) -> ChatShape:
    """The shape of the model's chat template (``shape_of``), its renders bounded as a turn's are; a template
    that leaves out the BOS its GGUF asks for is given one."""
    with deadline(TEMPLATE_DEADLINE_S):
        shape = shape_of(llm)
    if shape.lacks_bos:
        write_bos(llm)
    return shape


def _address_space_note() -> str:
    """Why a load may have failed when the process's address space is bounded (``ulimit -v``, a CI runner's or
    a container's limit): llama.cpp's allocations fail then as "Failed to create llama_context", which named
    neither the limit nor that the file is sound."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return ""
    return (
        f" (this process's address space is limited to {soft >> 20} MiB, ulimit -v: the model and its context "
        "may need more; raise it, `ulimit -v unlimited`, or lower n_ctx)"
    )


def model_changes(old: dict[str, LocalModelConfig], new: dict[str, LocalModelConfig]) -> list[str]:
    """What a reload changed in the local models, in words: after editing several, the operator's check
    that the edit said what was meant (a renamed entry is one removed and one added)."""
    said = [f"added {name}" for name in new if name not in old]
    said += [f"removed {name}" for name in old if name not in new]
    for name, model in new.items():
        if name in old and old[name] != model:
            keys = [f.name for f in dataclasses.fields(model) if getattr(model, f.name) != getattr(old[name], f.name)]
            said.append(f"changed {name} ({', '.join(keys)})")
    return said


def auto_cache_mb(kv_full_mb: float, room_mb: float) -> float:
    """The default dialogue cache: AUTO_CACHE_DIALOGUES full-context states, within a quarter of free memory
    and within the room the memory budget leaves beside the first model (on a small budget, more would be a
    limit status shows and the budget never lets the cache reach)."""
    try:
        free_mb = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (ValueError, OSError):
        free_mb = float("inf")
    return max(0.0, min(AUTO_CACHE_DIALOGUES * kv_full_mb, free_mb / 4, room_mb))


def kv_cache_mb(meta: dict[str, Any], n_ctx: int) -> float:
    """KV cache size of ``n_ctx`` tokens from the GGUF metadata, 0 when the fields are absent."""
    return kv_bytes_per_token(meta) * n_ctx / 2**20


def _header_kv_mb(path: Path, n_ctx: int) -> float:
    """The KV cache a model will take, read from its file's header before llama.cpp loads it."""
    try:
        return kv_cache_mb(read_metadata(path), n_ctx)
    except (NotGGUF, OSError):
        return 0.0  # llama.cpp's own load says what is wrong with the file


class LocalBackend:
    """The local models behind one fair gate: one generation at a time, round-robin across the doors and,
    within a door, across its clients."""

    def __init__(self, zoo: ModelZoo) -> None:
        self.zoo = zoo
        self.gate = FairGate(group=lambda client: door_of(cast(bytes, client)))
        self.tokens_per_s: float | None = None  # EWMA of measured generation speed
        self.turn_time = TurnTime()  # EWMA of a local turn's wall time: what each turn ahead makes one wait
        self.stopped_readings = StoppedReadings()
        # A client hanging up during its prompt, in a loop, is counted in status and logged once a minute.
        self._stops_said = Throttle(log)

    def slot(
        self, client: Hashable, cancelled: threading.Event, on_wait: Callable[[int], None] | None = None
    ) -> AbstractContextManager[bool]:
        return self.gate.slot(client, cancelled, on_wait)

    def expected_wait_s(self) -> float:
        """How long a turn queued now would wait for the local model: the turns ahead of it (waiting, and the
        one generating) at the recent turn time."""
        return self.turn_time.expected_wait_s(self.gate.waiting + self.gate.busy)

    def short_of_memory(self) -> set[str]:
        """The local models routing passes by while the memory cannot hold them (``ModelZoo.short_of_memory``)."""
        return self.zoo.short_of_memory()

    def fit(self, model: str, prompt: Prompt) -> Prompt:
        """Load the model and fit the messages to its context; raises before anything is generated (also
        for a JSON schema the model cannot be held to)."""
        answer_grammar(prompt.response_format)
        loaded = self.zoo.get(model)
        messages = cast(list[dict[str, str]], prompt.messages)  # local prompts are text only
        fitted, tokens_in, budget = fit_to_context(loaded.llm, messages, prompt.max_tokens)
        fitted_messages = cast(list[dict[str, object]], fitted)
        return dataclasses.replace(prompt, messages=fitted_messages, max_tokens=budget, tokens_in=tokens_in)

    def generate(self, model: str, prompt: Prompt) -> Generation:
        """Read the prompt and stream the answer from this thread, the one the first token leaves from."""
        loaded = self.zoo.get(model)
        return self._answer(loaded, prompt, self._open(model, loaded, prompt))

    def _answer(self, loaded: LoadedModel, prompt: Prompt, opened: Opened) -> Generation:
        """Read the stream to its end, a cancel or an escalation, and measure what it made (``cut``: it did
        not end by itself)."""
        answer, cut, finish = AnswerStream(prompt, loaded.llm, opened.logprobs), True, None
        try:
            with PromptReading(loaded.llm, prompt.cancelled):  # a cancel stops the prompt's reading too
                for chunk in opened.stream:
                    if prompt.cancelled.is_set():
                        break
                    finish = chunk["choices"][0].get("finish_reason") or finish
                    delta = chunk["choices"][0]["delta"].get("content")
                    if delta and not answer.add(str(delta)):
                        break  # the checkpoint escalated the turn: no more of this answer is wanted
                else:
                    answer.end()
                    cut = False
        except PromptStopped as stop:
            self.stopped_readings.count(stop)
            self._stops_said.say(
                loaded.config.name,
                logging.INFO,
                "a cancelled turn freed the local model %s with %d prompt tokens unread",
                loaded.config.name,
                stop.unread,
            )
        finally:
            opened.stream.close()
        end = time.perf_counter()
        # a chat handler that takes no logits processor leaves the count at 0: its pieces are counted instead
        tokens_out = max(opened.sampled.answer_tokens(finish, prompt.max_tokens), len(answer.parts))
        self._observe(answer, tokens_out, opened.started, end, prompt.cancelled.is_set())
        tokens, logprobs = answer.scored() if prompt.logprobs else ((), ())  # a checkpoint read its own
        return Generation(
            text="".join(answer.parts),
            tokens_in=prompt_tokens(loaded.llm, prompt),
            tokens_out=tokens_out,
            first_token_ms=None if answer.shown is None else (answer.shown - opened.started) * 1000,
            total_ms=(end - opened.started) * 1000,
            energy_j=tokens_out * loaded.config.joules_per_token,
            cancelled=prompt.cancelled.is_set(),
            escalated=answer.escalated,
            cut=cut,
            finish_reason=None if cut else finish,
            tokens=tokens,
            logprobs=logprobs,
        )

    def _observe(self, answer: AnswerStream, tokens_out: int, started: float, end: float, cancelled: bool) -> None:
        """Keep the generation speed and the turn time that the queue's expected wait is made of."""
        first = answer.first
        if first is not None and tokens_out > 1 and end > first:
            rate = (tokens_out - 1) / (end - first)
            self.tokens_per_s = rate if self.tokens_per_s is None else 0.8 * self.tokens_per_s + 0.2 * rate
        if not cancelled:
            self.turn_time.observe(end - started)

    def _open(self, model: str, loaded: LoadedModel, prompt: Prompt) -> Opened:
        """Give the context this dialogue's state and open the answer's stream (llama.cpp reads the prompt
        when its first chunk is asked for)."""
        started = time.perf_counter()
        self.zoo.cache.begin_turn(model, loaded.llm, prompt.session)
        logprobs = TokenLogprobs(loaded.llm) if prompt.logprobs or prompt.checkpoint else None
        sampled = SampledTokens()
        try:  # the chat template is rendered here; the prompt is read when the first chunk is asked for
            with deadline(TEMPLATE_DEADLINE_S):
                stream: Generator[Any, None, None] = loaded.llm.create_chat_completion(  # type: ignore[assignment]
                    messages=cast(Any, loaded.shape.shaped(prompt.messages)),  # as its chat template takes them
                    max_tokens=prompt.max_tokens,
                    temperature=DEVICE_TEMPERATURE if prompt.temperature is None else prompt.temperature,
                    seed=prompt.seed,
                    stop=[*prompt.stop, *loaded.shape.end_of_turn],
                    stream=True,
                    logits_processor=LogitsProcessorList([p for p in (logprobs, sampled) if p is not None]),
                    grammar=answer_grammar(prompt.response_format),
                    **prompt.sampling.given(),  # the rest stay llama.cpp's (top_p 0.95, no penalties)
                )
        except TEMPLATE_FAILURES as exc:
            raise ModelError(
                f"model {model!r}: its chat template cannot format this conversation: {first_line(exc)}",
                code="model_template",
            ) from None
        return Opened(stream, started, sampled, logprobs)
