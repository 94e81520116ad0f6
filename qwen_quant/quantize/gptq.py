"""GPTQ (Frantar et al., 2022) for one linear layer, given the Hessian of its inputs.

Written here rather than taken from a package: auto-gptq is archived, GPTQModel needs a newer
torch than our GPU image has, and llm-compressor pins transformers; the algorithm is ~80 lines.
We follow the reference implementation (IST-DASLab/gptq ``fasterquant``): dampening by ``damp`` x
mean(diag H), the upper Cholesky factor of H^-1, lazy column blocks of 128, and group parameters
chosen from the error-compensated weights when each group starts. With ``desc_act`` columns are
visited in order of decreasing diag(H) while groups stay static (parameters from the original
weights, in natural column order), so ``g_idx`` stays ``col // group_size`` and every kernel can
use the checkpoint.
"""

from __future__ import annotations

import torch

from qwen_quant.quantize.grid import Grid, QuantResult, find_params, quantize_codes


class Hessian:
    """Running H = 2/n * sum x x^T over every token seen by a linear's input."""

    def __init__(self, columns: int, device):
        self.H = torch.zeros(columns, columns, device=device, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H.addmm_(x.T, x)


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, grid: Grid, damp: float = 0.01,
                  desc_act: bool = False, blocksize: int = 128) -> QuantResult:
    W = weight.detach().float().clone()
    H = H.clone()
    rows, cols = W.shape
    gs = grid.size(cols)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    # static per-group parameters when columns are reordered; else chosen as each group starts
    static = [find_params(W[:, i:i + gs], grid) for i in range(0, cols, gs)] if desc_act else None
    perm = torch.argsort(torch.diag(H), descending=True) if desc_act else torch.arange(cols, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]

    H[range(cols), range(cols)] += damp * torch.mean(torch.diag(H))
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:
        from qwen_quant.errors import QuantError

        raise QuantError(f"GPTQ Hessian is not positive definite even with damp {damp}; raise --damp (e.g. 0.1)") from None

    Q = torch.zeros_like(W)
    groups = cols // gs
    scales = torch.zeros(rows, groups, device=W.device)
    zeros = torch.zeros(rows, groups, device=W.device)
    scale = zero = None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Err1 = W[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, device=W.device)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(perm[col]) // gs
            if static is not None:
                scale, zero = static[g]
            elif col % gs == 0:
                scale, zero = find_params(torch.cat([W1[:, i:], W[:, i2:]], 1)[:, :gs], grid)
            scales[:, g], zeros[:, g] = scale, zero
            w, d = W1[:, i], Hinv1[i, i]
            q = quantize_codes(w[:, None], scale, zero, grid.maxq).flatten()
            Q[:, col] = q
            err = (w - scale * (q - zero)) / d
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    inv = torch.argsort(perm)
    g_idx = (torch.arange(cols, device=W.device) // gs).int()
    return QuantResult(Q[:, inv].int(), scales, zeros.int(), g_idx, grid)
