"""Perplexity and parity metrics, computed where the logits are (GPU or CPU), in torch.

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

Why hand-written: these are a few lines of log-softmax arithmetic, but they must run on the device
that holds the logits (a 2048 x 152k float32 window is 1.2 GB; copying it to the host made a 7B
evaluation 100x slower than the model's forward), in bounded memory, and identically for every
backend. So `Accumulator.add` takes torch tensors (or numpy arrays from the llama.cpp/onnxruntime
backends, moved to torch), works through the positions in chunks of about ``CHUNK_BYTES`` per float32
[positions, vocab] temporary, and keeps only per-position scalars (NLL, KL, top-1) as device tensors;
`result()` concatenates them once at the end (sums in float64, the p99 exactly as numpy's linear
percentile). The float32 log-softmax per position and float64 KL sum are the same arithmetic as the
earlier numpy path, which the tests keep as a reference implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

CHUNK_BYTES = 2**29  # one float32 [positions, vocab] temporary: 0.5 GiB (~880 positions at 152k vocab)


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


def as_tensor(x, device=None) -> torch.Tensor:
    """A torch view of a backend's output (numpy from llama.cpp/onnxruntime, torch from torch)."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t if device is None else t.to(device)


def position_chunks(n: int, vocab: int, chunk_bytes: int = CHUNK_BYTES):
    step = max(1, chunk_bytes // max(1, 4 * vocab))
    for s in range(0, n, step):
        yield slice(s, min(n, s + step))


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    """float32 log-softmax as ``x - logsumexp(x)``: torch's CPU ``log_softmax`` kernel sums 152k
    exponentials in float32 with errors up to 1e-4 per position, its ``logsumexp`` stays near 1e-6."""
    x = x.float()
    return x - torch.logsumexp(x, dim=-1, keepdim=True)


def top1_agree(lr: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """Top-1 agreement per position, exact ties counted as agreement.

    Plain ``argmax == argmax`` depends on how each side breaks a tie at the maximum: in fp16, 9 of 2032
    positions of the fixtures tie, and the dense and top-k paths broke them differently, which cost a
    third of the 0.5-point drop limit for nothing. So a position agrees when the test's top token is *a*
    reference maximum, or the reference's top token is a test maximum.
    """
    rt, tt = lr.argmax(-1, keepdim=True), lp.argmax(-1, keepdim=True)
    a = lr.gather(-1, tt) >= lr.max(-1, keepdim=True).values
    b = lp.gather(-1, rt) >= lp.max(-1, keepdim=True).values
    return (a | b)[..., 0]


def window_scores(logits, targets, ref_logits=None, chunk_bytes: int = CHUNK_BYTES):
    """Per-position (nll, kl, top1, ref_nll) for one window's scored positions, on the logits' device.

    ``logits``/``ref_logits`` [T, V] (any float dtype), ``targets`` [T]. kl/top1/ref_nll are None
    without a reference. Each chunk is upcast to float32 before the log-softmax. ``logits`` may also
    be an object with its own ``window_scores(targets, ref_logits)`` (a backend that returns top-k
    log-probabilities instead of full logits, `validate.topk`), which is then asked instead.
    """
    if hasattr(logits, "window_scores"):
        return logits.window_scores(targets, ref_logits)
    lg = as_tensor(logits)
    tg = as_tensor(targets, lg.device).long()
    rl = None if ref_logits is None else as_tensor(ref_logits, lg.device)
    nll, kl, top1, rnll = [], [], [], []
    for sl in position_chunks(lg.shape[0], lg.shape[-1], chunk_bytes):
        lp = log_softmax(lg[sl])
        t = tg[sl, None]
        nll.append(-lp.gather(1, t)[:, 0])
        if rl is not None:
            lr = log_softmax(rl[sl])
            rnll.append(-lr.gather(1, t)[:, 0])
            k = (lr.exp() * (lr - lp)).sum(-1, dtype=torch.float64)
            kl.append(torch.clamp(k, min=0.0))
            top1.append(top1_agree(lr, lp))
            del lr
        del lp
    cat = lambda xs: torch.cat(xs) if xs else None  # noqa: E731
    return cat(nll), cat(kl), cat(top1), cat(rnll)


def percentile(x: torch.Tensor, q: float) -> float:
    """numpy's default (linear) percentile, exact, for any length (torch.quantile caps its input size)."""
    s, _ = torch.sort(x.double().flatten())
    pos = (s.numel() - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))


@dataclass
class Accumulator:
    """Per-position scalars of every window, kept on the device; nothing full-vocabulary is kept.

    With a reference, ``add`` also records the reference's own NLL (its perplexity on the same
    positions), so one pass over the two models gives both perplexities, the KL and top-1.
    """

    nll: list[torch.Tensor] = field(default_factory=list)
    kl: list[torch.Tensor] = field(default_factory=list)
    top1: list[torch.Tensor] = field(default_factory=list)
    ref_nll: list[torch.Tensor] = field(default_factory=list)
    chunk_bytes: int = CHUNK_BYTES

    def add(self, logits, targets, ref_logits=None) -> int:
        """``logits`` [T, V] at the scored positions, ``targets`` [T] the tokens that follow them."""
        nll, kl, top1, rnll = window_scores(logits, targets, ref_logits, self.chunk_bytes)
        if nll is None:
            return 0
        self.nll.append(nll)
        if kl is not None:
            self.kl.append(kl)
            self.top1.append(top1)
            self.ref_nll.append(rnll)
        return int(nll.numel())

    def add_scores(self, nll, kl=None, top1=None, ref_nll=None) -> None:
        """Append already computed per-position scores (the streamed evaluator's path)."""
        self.nll.append(nll)
        if kl is not None:
            self.kl.append(kl)
            self.top1.append(top1)
            self.ref_nll.append(ref_nll)

    @staticmethod
    def _mean_ppl(parts: list[torch.Tensor]) -> tuple[int, float, float]:
        if not parts:
            return 0, float("nan"), float("nan")
        x = torch.cat([p.double().cpu() for p in parts])
        m = float(x.mean()) if x.numel() else float("nan")
        return int(x.numel()), m, math.exp(m) if x.numel() else float("nan")

    def result(self) -> dict[str, float]:
        n, nll_mean, ppl = self._mean_ppl(self.nll)
        out = {"tokens_scored": n, "perplexity": ppl, "nll_mean": nll_mean}
        if self.kl:
            kl = torch.cat([k.double().cpu() for k in self.kl])
            top1 = torch.cat([t.cpu() for t in self.top1])
            out.update(kl_mean=float(kl.mean()), kl_p99=percentile(kl, 99), kl_max=float(kl.max()),
                       top1_agreement=float(top1.double().mean()))
            _, _, rppl = self._mean_ppl(self.ref_nll)
            out["ref_perplexity"] = rppl
            out["ppl_ratio"] = ppl / rppl
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
