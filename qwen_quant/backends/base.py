"""The one interface every validation backend implements.

Metrics never know which runtime they talk to: they hand token ids to a backend and get
next-token logits back (teacher-forced), or ask for ``n`` greedy tokens after a prompt.
The same token ids go to every backend, so tokenizer differences can never hide in a metric.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np


class Backend(ABC):
    """A loaded artifact that can score tokens.

    ``name``: backend kind ("torch", "llama.cpp", "onnxruntime").
    ``device``: where it runs ("cpu", "cuda", "cuda:0").
    ``dtype``: compute dtype as a string ("float32", "float16", "bfloat16", or the GGUF type).
    ``vocab_size``: size of the logits' last axis.
    """

    name: str = "?"
    device: str = "cpu"
    dtype: str = "float32"
    vocab_size: int = 0

    @abstractmethod
    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Teacher-forced logits: ``ids`` int64 [batch, seq] -> float32 [batch, seq, vocab].

        Row ``t`` holds the distribution of the token that follows ``ids[:, :t+1]``.
        Every row of ``ids`` starts a fresh sequence (no state kept between calls).
        """

    @abstractmethod
    def greedy(self, prompt_ids: Sequence[int], n: int) -> list[int]:
        """The ``n`` tokens greedy decoding appends to ``prompt_ids``; never stops early on EOS."""

    def versions(self) -> dict[str, str]:
        """Versions of the runtime libraries this backend uses, for the report."""
        return {}

    def close(self) -> None:
        """Free the model; the backend is unusable afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
