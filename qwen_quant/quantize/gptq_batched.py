"""GPTQ for many linears of one shape at once: a MoE layer's experts, each with its own Hessian.

The algorithm is `gptq.gptq_quantize`'s (dampening, upper Cholesky factor of H^-1, lazy blocks of
128 columns, group parameters from the error-compensated weights when each group starts), with a
leading expert dimension on every tensor: one batched Cholesky for the E Hessians [E, K, K], one
column loop whose steps update all experts together, and one batched matmul per block for the error
propagation. A Qwen3-30B-A3B layer has 128 experts; a Python loop of 128 separate solves launches
128x the kernels for matrices too small to fill a GPU, which is what this replaces.

Written here because no library offers a batched GPTQ solve (GPTQModel and llm-compressor loop over
experts). Covered: static groups in natural column order (``desc_act`` off); act-order experts use
the per-expert solve. Codes equal the per-expert solve's up to float rounding of the batched
matmuls (the tests compare them).
"""

from __future__ import annotations

import torch

from qwen_quant.errors import QuantError
from qwen_quant.quantize.grid import Grid, QuantResult, minmax_params


def _quad(A: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per-row a H a^T for every expert: [E, R]."""
    return (A * torch.bmm(A, H)).sum(-1)


def gptq_quantize_batched(weight: torch.Tensor, H: torch.Tensor, grid: Grid, damp: float = 0.01,
                          blocksize: int = 128) -> list[QuantResult]:
    """GPTQ codes for ``weight`` [E, rows, cols] given Hessians ``H`` [E, cols, cols] (overwritten)."""
    W = weight.detach().float().clone()
    E, rows, cols = W.shape
    gs = grid.size(cols)
    diag = H.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0  # [E, cols]
    diag.masked_fill_(dead, 1)
    W.masked_fill_(dead[:, None, :], 0)
    groups = cols // gs
    scales = torch.zeros(E, rows, groups, device=W.device)
    zeros = torch.zeros(E, rows, groups, device=W.device)

    W0 = W.clone()
    den = _quad(W0, H)
    add = damp * diag.mean(-1)  # [E]
    diag.add_(add[:, None])
    L, info = torch.linalg.cholesky_ex(H)
    if bool((info > 0).any()):
        raise QuantError(f"GPTQ Hessian is not positive definite even with damp {damp}; raise --damp (e.g. 0.1)")
    Hi = torch.cholesky_inverse(L)
    del L
    Hinv, info = torch.linalg.cholesky_ex(Hi, upper=True)
    del Hi
    if bool((info > 0).any()):
        raise QuantError(f"GPTQ Hessian is not positive definite even with damp {damp}; raise --damp (e.g. 0.1)")

    maxq = grid.maxq
    scale = zero = None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, :, i1:i2].clone()
        Q1, Err1 = torch.empty_like(W1), torch.empty_like(W1)
        Hinv1 = Hinv[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % gs == 0:  # the group's parameters from this block's rest and, past it, W
                cur = W1[:, :, i:i + gs]
                xmin, xmax = cur.amin(-1), cur.amax(-1)
                if col + gs > i2:
                    rest = W[:, :, i2:col + gs]
                    xmin, xmax = torch.minimum(xmin, rest.amin(-1)), torch.maximum(xmax, rest.amax(-1))
                scale, zero = minmax_params(xmin, xmax, grid)  # [E, rows]
                scales[:, :, col // gs], zeros[:, :, col // gs] = scale, zero
            w = W1[:, :, i]
            q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)  # grid.quantize_codes, per expert and row
            Q1[:, :, i] = q
            d = Hinv1[:, i, i][:, None]  # [E, 1]
            err = (w - scale * (q - zero)) / d
            W1[:, :, i:] -= err[:, :, None] * Hinv1[:, None, i, i:]
            Err1[:, :, i] = err
        W[:, :, i1:i2] = Q1
        W[:, :, i2:] -= torch.bmm(Err1, Hinv[:, i1:i2, i2:])

    del Hinv
    gidx = torch.arange(cols, device=W.device) // gs
    D = W0 - scales[:, :, gidx] * (W - zeros[:, :, gidx])
    D.masked_fill_(dead[:, None, :], 0)
    num = _quad(D, H) - add[:, None] * D.pow(2).sum(-1)
    del D, W0
    g_idx = gidx.int()
    out = []
    for e in range(E):
        r = QuantResult(W[e].to(torch.int32), scales[e].clone(), zeros[e].int(), g_idx.clone(), grid)
        r.row_stats = (num[e], den[e])
        r.error = float(num[e].sum() / den[e].sum().clamp_min(1e-20))
        out.append(r)
    return out
