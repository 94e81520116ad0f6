"""Metrics from top-k log-probs, for runtimes that do not hand out full distributions (vLLM).

vLLM's ``prompt_logprobs=k`` gives, per position, the k most likely tokens with their log-probs plus the
log-prob of the token that actually follows (``prompt_logprobs=-1`` gives all of them, but as Python
objects: ~150k per position, gigabytes per window at Qwen's vocabulary, so it is not used). From that:

- NLL / perplexity: exact (the actual token's log-prob is always returned);
- top-1: exact (rank 1 is always returned);
- KL(P_ref || P_test): the reference is a dense backend (torch). The vocabulary is coarse-grained into
  the k+1 returned tokens S and one bin "rest" holding all others:
  ``KL_k = sum_{i in S} p_i log(p_i / q_i) + p_rest log(p_rest / q_rest)``, with ``p_rest = 1 - sum_S p``
  and ``q_rest = 1 - sum_S q``. Merging outcomes never increases a KL divergence (log-sum inequality),
  so KL_k is a lower bound of the exact KL; the gap is the divergence *inside* the rest bin, weighted by
  its mass. `from_dense` makes the same top-k view from full logits, so the gap is measured on the
  fixtures with the torch backend (tests/test_vllm.py): on an int4-RTN copy of qwen2-tiny-untied the
  top-k KL is lower than the exact one by 68% (k=1), 40% (k=5), 14% (k=20) and 3.6% (k=100).

`TopKLogprobs` stands in for a [batch, seq, vocab] logits array: it is indexed on the leading axes like
one, and `qwen_quant.validate.metrics.window_scores` hands it to `window_scores` here instead of doing
a log-softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qwen_quant.validate.metrics import as_tensor, log_softmax


@dataclass
class TopKLogprobs:
    """Per position: ``ids`` int64 [..., K] (-1: empty slot) and their ``logprobs`` float32 [..., K]."""

    ids: np.ndarray
    logprobs: np.ndarray
    vocab_size: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.ids.shape[:-1], self.vocab_size)

    @property
    def device(self) -> torch.device:  # where the evaluator puts the targets; the arrays live on the host
        return torch.device("cpu")

    def __getitem__(self, key) -> "TopKLogprobs":
        key = key if isinstance(key, tuple) else (key,)
        if len(key) >= self.ids.ndim:
            raise IndexError("TopKLogprobs is indexed on its leading (batch, position) axes only")
        return TopKLogprobs(self.ids[key], self.logprobs[key], self.vocab_size)

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_dense(cls, logits, k: int, targets=None) -> "TopKLogprobs":
        """The view vLLM would return for these logits: top-k, plus ``targets`` (the following tokens)."""
        lp = log_softmax(as_tensor(logits))
        top = lp.topk(k, dim=-1)
        ids, vals = top.indices, top.values
        if targets is not None:
            t = torch.as_tensor(np.asarray(targets)).long().reshape(*lp.shape[:-1], 1)
            tv = lp.gather(-1, t)
            dup = (ids == t).any(-1, keepdim=True)
            ids = torch.cat([torch.where(dup, torch.full_like(t, -1), t), ids], -1)
            vals = torch.cat([torch.where(dup, torch.full_like(tv, -float("inf")), tv), vals], -1)
        return cls(ids.numpy(), vals.numpy(), int(lp.shape[-1]))

    def window_scores(self, targets, ref_logits=None):
        """(nll, kl, top1, ref_nll) per position, as `metrics.window_scores` returns them.

        Computed where the reference logits are (the [T, vocab] block is not copied; the top-k arrays are small).
        """
        rl = None
        if ref_logits is not None:
            rl = ref_logits if isinstance(ref_logits, torch.Tensor) else torch.from_numpy(np.asarray(ref_logits))
        dev = rl.device if rl is not None else torch.device("cpu")
        ids = torch.from_numpy(np.ascontiguousarray(self.ids)).long().to(dev)
        lq = torch.from_numpy(np.ascontiguousarray(self.logprobs)).float().to(dev)
        tg = (targets if isinstance(targets, torch.Tensor) else torch.as_tensor(np.asarray(targets))).long().to(dev)
        valid = ids >= 0
        hit = (ids == tg[:, None]) & valid
        if not bool(hit.any(-1).all()):
            raise ValueError("top-k log-probs lack the target token's log-prob at some position")
        nll = -(torch.where(hit, lq, torch.zeros_like(lq)).sum(-1))
        test_top = torch.gather(ids, 1, torch.where(valid, lq, torch.full_like(lq, -float("inf"))).argmax(-1, keepdim=True))[:, 0]
        if rl is None:
            return nll, None, None, None
        lr = log_softmax(rl)
        ref_nll = -lr.gather(1, tg[:, None])[:, 0]
        # ties at the maximum count as agreement (see `metrics.top1_agree`): the test's top token is a
        # reference maximum, or the reference's top token is listed with the test's maximum log-prob
        ref_top = lr.argmax(-1, keepdim=True)
        top1 = lr.gather(1, test_top[:, None])[:, 0] >= lr.max(-1).values
        best = torch.where(valid, lq, torch.full_like(lq, -float("inf"))).max(-1, keepdim=True).values
        top1 = top1 | ((ids == ref_top) & valid & (lq >= best)).any(-1)
        safe = ids.clamp(min=0)
        lp_s = lr.gather(1, safe).double()
        lq_s = lq.double()
        p_s = torch.where(valid, lp_s.exp(), torch.zeros_like(lp_s))
        q_s = torch.where(valid, lq_s.exp(), torch.zeros_like(lq_s))
        inside = torch.where(valid & (p_s > 0), p_s * (lp_s - lq_s), torch.zeros_like(p_s)).sum(-1)
        p_rest = (1.0 - p_s.sum(-1)).clamp(min=0.0)
        q_rest = (1.0 - q_s.sum(-1)).clamp(min=1e-30)
        rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp(min=1e-300).log() - q_rest.log()), torch.zeros_like(p_rest))
        kl = torch.clamp(inside + rest, min=0.0)
        return nll, kl, top1, ref_nll


def exact_vs_topk_kl(test_logits, ref_logits, targets, k: int) -> tuple[float, float]:
    """(exact mean KL, top-k-binned mean KL) of one window: the approximation error on real logits."""
    from qwen_quant.validate.metrics import window_scores

    _, exact, _, _ = window_scores(test_logits, targets, ref_logits)
    _, approx, _, _ = TopKLogprobs.from_dense(test_logits, k, targets).window_scores(targets, ref_logits)
    return float(exact.double().mean()), float(approx.double().mean())
