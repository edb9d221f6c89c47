"""The log-probability of each token a local model samples, without ``logits_all``.

llama-cpp-python returns per-token log-probs only when the context keeps every position's logits
(``logits_all=True``: n_ctx x n_vocab floats, about 400 MB for the embedded model's 2048-token context, and
slower prompts). The sampler sees the last position's logits anyway: a logits processor placed first in
its chain reads them (it changes nothing), and the token chosen from them is the one evaluated next. So a
token's log-prob is known one step later; the last token's, never evaluated, is taken as the most likely
token's, which is exact for greedy decoding. 0.1-2 % of a token's time on the embedded model (docs/benchmarks.md).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from llama_cpp import Llama


class TokenLogprobs:
    """A llama.cpp logits processor recording (token id, log-prob) for each sampled token; one per answer."""

    def __init__(self, llm: Llama) -> None:
        self._eos = llm.token_eos()
        self._steps: list[tuple[int, float]] = []
        self._last: tuple[npt.NDArray[np.float32], float] | None = None
        self._stopped = False

    def stop(self) -> None:
        """Read no more: the rest of the answer's tokens are sampled as if no processor were there."""
        self._stopped = True

    def __call__(self, input_ids: npt.NDArray[np.intc], logits: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
        if self._stopped:
            return logits
        if self._last is not None:  # the token sampled from the previous logits has just been evaluated
            previous, norm = self._last
            token = int(input_ids[-1])
            self._steps.append((token, float(previous[token]) - norm))
        row = np.array(logits, dtype=np.float32)  # the sampler's view is strided and rewritten each step
        top = float(row.max())
        self._last = (row, top + math.log(float(np.exp(row - top).sum())))
        return logits

    def tokens(self) -> list[tuple[int, float]]:
        """(id, log-prob) of every answer token so far, an end-of-generation token left out."""
        if self._last is None:
            return list(self._steps)
        row, norm = self._last
        token = int(row.argmax())
        last = [] if token == self._eos else [(token, float(row[token]) - norm)]
        return self._steps + last
