"""The one interface every validation backend implements.

Metrics never know which runtime they talk to: they hand token ids to a backend and get
next-token logits back (teacher-forced), or ask for ``n`` greedy tokens after a prompt.
The same token ids go to every backend, so tokenizer differences can never hide in a metric.

``logits`` (numpy, the original contract) is what the llama.cpp and onnxruntime backends implement.
The evaluator calls ``device_logits`` and ``greedy_batch``: their defaults here wrap ``logits`` and
``greedy``, so those backends work unchanged, while the torch backend overrides them to keep logits
on the GPU (no host copy of the [batch, seq, vocab] block) and to decode all prompts in one batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np


class Backend(ABC):
    """A loaded artifact that can score tokens.

    ``name``: backend kind ("torch", "llama.cpp", "onnxruntime").
    ``device``: where it runs ("cpu", "cuda", "cuda:0", or "cuda:0,1" when split over GPUs).
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

    def device_logits(self, ids: np.ndarray, keep: int | None = None):
        """Like ``logits`` but a torch tensor, left where the backend computed it (any float dtype).

        ``keep``: only the last ``keep`` positions are needed (the scored half of a window), so a
        backend may skip the vocabulary projection of the others.
        """
        import torch

        out = torch.from_numpy(np.asarray(self.logits(ids)))
        return out if keep is None else out[:, -keep:]

    def greedy_batch(self, prompts: Sequence[Sequence[int]], n: int) -> list[list[int]]:
        """``greedy`` for every prompt; a backend may decode them together (same tokens per prompt)."""
        return [self.greedy(p, n) for p in prompts]

    def versions(self) -> dict[str, str]:
        """Versions of the runtime libraries this backend uses, for the report."""
        return {}

    def close(self) -> None:
        """Free the model; the backend is unusable afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
