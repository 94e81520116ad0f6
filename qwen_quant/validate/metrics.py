"""Perplexity and parity metrics, computed from logits any backend returns.

Perplexity methods (documented in README.md, "Metrics"):
- ``windows`` (default, as llama.cpp's llama-perplexity): the token stream is cut into
  non-overlapping windows of ``ctx`` tokens; each window is evaluated from scratch and only the
  tokens in its second half are scored: the logits at positions ctx/2 .. ctx-2 predict tokens
  ctx/2+1 .. ctx-1, so every scored token has more than ctx/2 tokens of context (ctx/2 - 1 scored
  tokens per window, exactly as llama-perplexity counts them).
  PPL = exp(mean NLL over scored tokens).
- ``stride`` (Hugging Face's sliding-window recipe): windows of ``ctx`` tokens advance by ``stride``;
  each window scores only the tokens not scored by an earlier window (the first window scores all but
  its first token).

Parity against a reference, on exactly the scored positions above and identical token ids:
top-1 agreement (argmax equal), KL(P_ref || P_test) per position (mean, p99, max).
We write these ourselves because they must run identically over every backend's numpy logits;
they are a few lines of log-softmax arithmetic (float32 per position, sums in float64) on torch's kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Window:
    start: int  # first token of the window in the stream
    score_from: int  # first position (within the window) whose *target* token is scored


def windows(n_tokens: int, ctx: int, method: str = "windows", stride: int | None = None) -> list[Window]:
    """Windows over a stream of ``n_tokens``; each is ``ctx`` tokens long."""
    if method == "windows":
        return [Window(s, ctx // 2) for s in range(0, n_tokens - ctx + 1, ctx)]
    if method == "stride":
        stride = stride or ctx // 2
        out, scored_until = [], 0  # scored_until: stream index of the last scored target + 1
        for s in range(0, max(n_tokens - ctx, 0) + 1, stride):
            first_target = max(scored_until, s + 1)
            out.append(Window(s, first_target - s - 1))
            scored_until = s + ctx
        return out
    raise ValueError(f"unknown perplexity method {method!r}")


def log_softmax(x: np.ndarray) -> np.ndarray:
    """float32 log-softmax over the last axis (torch's kernel: multithreaded, numerically stable)."""
    import torch

    return torch.log_softmax(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), dim=-1).numpy()


@dataclass
class Accumulator:
    """Streams window results into the final numbers, so no full logit matrix is ever kept."""

    nll: list[np.ndarray] = field(default_factory=list)
    kl: list[np.ndarray] = field(default_factory=list)
    top1: list[np.ndarray] = field(default_factory=list)

    def add(self, logits: np.ndarray, targets: np.ndarray, ref_logits: np.ndarray | None = None) -> None:
        """``logits`` [T, V] at the scored positions, ``targets`` [T] the tokens that follow them."""
        import torch

        lp = torch.from_numpy(log_softmax(logits))
        self.nll.append(-lp[torch.arange(len(targets)), torch.from_numpy(np.asarray(targets))].numpy())
        if ref_logits is not None:
            lr = torch.from_numpy(log_softmax(ref_logits))
            kl = (lr.exp() * (lr - lp)).sum(-1, dtype=torch.float64)
            self.kl.append(torch.clamp(kl, min=0.0).numpy())
            self.top1.append(ref_logits.argmax(-1) == logits.argmax(-1))

    def result(self) -> dict[str, float]:
        nll = np.concatenate(self.nll).astype(np.float64) if self.nll else np.zeros(0)
        out = {"tokens_scored": int(nll.size), "perplexity": float(np.exp(nll.mean())) if nll.size else float("nan"),
               "nll_mean": float(nll.mean()) if nll.size else float("nan")}
        if self.kl:
            kl = np.concatenate(self.kl)
            out.update(kl_mean=float(kl.mean()), kl_p99=float(np.percentile(kl, 99)), kl_max=float(kl.max()),
                       top1_agreement=float(np.concatenate(self.top1).mean()))
        return out


def greedy_parity(test: list[list[int]], ref: list[list[int]]) -> dict[str, float]:
    """Prefix-match length (tokens equal before the first difference) and exact matches."""
    prefix = []
    for t, r in zip(test, ref):
        k = 0
        while k < min(len(t), len(r)) and t[k] == r[k]:
            k += 1
        prefix.append(k)
    n = max((len(r) for r in ref), default=0)
    return {"greedy_prompts": len(ref), "greedy_tokens": n,
            "greedy_prefix_mean": float(np.mean(prefix)) if prefix else 0.0,
            "greedy_prefix_min": int(min(prefix)) if prefix else 0,
            "greedy_exact": int(sum(p == len(r) for p, r in zip(prefix, ref)))}
