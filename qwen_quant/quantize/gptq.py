"""GPTQ (Frantar et al., 2022) for one linear layer, given the Hessian of its inputs.

Written here rather than taken from a package: auto-gptq is archived, GPTQModel needs a newer
torch than our GPU image has, and llm-compressor pins transformers; the algorithm is ~80 lines.
We follow the reference implementation (IST-DASLab/gptq ``fasterquant``): dampening by ``damp`` x
mean(diag H), the upper Cholesky factor of H^-1, lazy column blocks of 128, and group parameters
chosen from the error-compensated weights when each group starts. With ``desc_act`` columns are
visited in order of decreasing diag(H) while groups stay static (parameters from the original
weights, in natural column order), so ``g_idx`` stays ``col // group_size`` and every kernel can
use the checkpoint.

Kept fast on the GPU without changing what is computed: nothing inside the column loop waits for
the device (no ``int()``/``.item()``/masked assignment; ``Hinv[i, i]`` stays a device scalar), a
group's min/max come from the block being solved plus, for groups wider than a block, the untouched
rest of the row (min/max compose, so nothing is concatenated), solved codes overwrite the columns
they came from (no second [rows, cols] buffer), and linears that share an input (q/k/v, gate/up) are
solved as one stacked matrix with one Hessian (rows are independent given H). The Hessian is a
running fp32 sum of x x^T; on CUDA half-precision inputs are multiplied with fp32 output
(``out_dtype``), which is the same product as upcasting first (fp16 values are exact in fp32) at
tensor-core speed.
"""


from __future__ import annotations

import torch

from qwen_quant.quantize import gptq_triton
from qwen_quant.quantize.grid import Grid, QuantResult, minmax_params, quantize_codes


MM_MODE = ["addmm_out"]  # how half inputs reach the fp32 sum on CUDA; steps down after a failure


class Hessian:
    """H = 2/n * sum x x^T over every token seen by a linear's input (fp32 sum on x's device)."""

    def __init__(self, columns: int, device):
        self.S = torch.zeros(columns, columns, device=device, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        self.n += x.shape[0]
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            if MM_MODE[0] == "addmm_out":  # in place, no temporary (torch >= 2.12)
                try:
                    torch.addmm(self.S, x.T, x, out_dtype=torch.float32, out=self.S)
                    return
                except (RuntimeError, TypeError):
                    MM_MODE[0] = "mm_add"
            if MM_MODE[0] == "mm_add":  # a cols x cols float32 temporary (torch 2.8-2.11)
                try:
                    self.S.add_(torch.mm(x.T, x, out_dtype=torch.float32))
                    return
                except (RuntimeError, TypeError):
                    MM_MODE[0] = "float"
        x = x.float()
        self.S.addmm_(x.T, x)

    @property
    def H(self) -> torch.Tensor:
        return self.S * (2.0 / max(self.n, 1))


def _quad(A: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per-row a H a^T: the error estimate's only large matmuls (rows x cols^2). On CUDA they run in
    TF32, which is ample for a reported relative error and 8x faster than strict fp32."""
    if not A.is_cuda:
        return (A * (A @ H)).sum(1)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return (A * (A @ H)).sum(1)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def _group_params(W1, W, i, i2, col, gs, grid):
    """Parameters of the group starting at ``col`` from the error-compensated weights: the rest of
    this block (``W1[:, i:]``) and, when the group reaches past the block, ``W[:, i2:col + gs]``."""
    cur = W1[:, i:i + gs]
    xmin, xmax = cur.amin(1), cur.amax(1)
    if col + gs > i2:
        rest = W[:, i2:col + gs]
        xmin, xmax = torch.minimum(xmin, rest.amin(1)), torch.maximum(xmax, rest.amax(1))
    return minmax_params(xmin, xmax, grid)


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, grid: Grid, damp: float = 0.01,
                  desc_act: bool = False, blocksize: int = 128, own_hessian: bool = False) -> QuantResult:
    """GPTQ codes for ``weight`` [rows, cols] given its input Hessian ``H`` [cols, cols].

    ``own_hessian``: H may be overwritten (saves a cols x cols copy, 3.5 GB for Qwen2-72B's down_proj).
    """
    W = weight.detach().float().clone()
    H = H if own_hessian else H.clone()
    rows, cols = W.shape
    gs = grid.size(cols)
    dead = torch.diag(H) == 0
    H.diagonal().masked_fill_(dead, 1)
    W.masked_fill_(dead[None, :], 0)

    groups = cols // gs
    if desc_act:  # static groups: parameters from the original weights, in natural column order
        g = W.reshape(rows, groups, gs)
        scales, zeros = minmax_params(g.amin(-1), g.amax(-1), grid)
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        col_group = perm // gs
    else:
        scales = torch.zeros(rows, groups, device=W.device)
        zeros = torch.zeros(rows, groups, device=W.device)
        perm = None

    W0 = W.clone()  # (permuted) weights before the solve, for the error estimate
    den = _quad(W0, H)  # ||W X||^2 per row through H (dead columns contribute 0)
    add = damp * torch.mean(torch.diag(H))
    H.diagonal().add_(add)
    try:
        L = torch.linalg.cholesky(H)
        Hi = torch.cholesky_inverse(L)
        del L  # at most three cols x cols matrices live at once (H, L or H^-1, Hinv)
        Hinv = torch.linalg.cholesky(Hi, upper=True)
        del Hi
    except torch.linalg.LinAlgError:
        from qwen_quant.errors import QuantError

        raise QuantError(f"GPTQ Hessian is not positive definite even with damp {damp}; raise --damp (e.g. 0.1)") from None

    maxq = grid.maxq
    scale = zero = None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1, Err1 = torch.empty_like(W1), torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if desc_act:
            S1, Z1 = scales[:, col_group[i1:i2]], zeros[:, col_group[i1:i2]]
        elif (gs % blocksize == 0 or gs == cols) and gptq_triton.usable(W1, i2 - i1):
            if i1 % gs == 0:  # one set of group parameters for the whole block
                scale, zero = _group_params(W1, W, 0, i2, i1, gs, grid)
                scales[:, i1 // gs], zeros[:, i1 // gs] = scale, zero
            if gptq_triton.block_update(W1, Q1, Err1, Hinv1, scale, zero, maxq):
                W[:, i1:i2] = Q1
                W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
                continue
        for i in range(i2 - i1):
            col = i1 + i
            if desc_act:
                scale, zero = S1[:, i], Z1[:, i]
            elif col % gs == 0:
                scale, zero = _group_params(W1, W, i, i2, col, gs, grid)
                scales[:, col // gs], zeros[:, col // gs] = scale, zero
            w = W1[:, i]
            q = quantize_codes(w[:, None], scale, zero, maxq).flatten()
            Q1[:, i] = q
            err = (w - scale * (q - zero)) / Hinv1[i, i]
            W1[:, i:] -= torch.outer(err, Hinv1[i, i:])
            Err1[:, i] = err
        W[:, i1:i2] = Q1  # solved columns are not read again: keep their codes in place
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    del Hinv
    # ||(W - Q) X||^2 per row through the undamped H = H_damped - add * I on live columns (dead: D = 0)
    gidx_perm = (perm if perm is not None else torch.arange(cols, device=W.device)) // gs
    D = W0 - scales[:, gidx_perm] * (W - zeros[:, gidx_perm])
    D.masked_fill_(dead[perm if perm is not None else slice(None)][None, :], 0)
    num = _quad(D, H) - add * D.pow(2).sum(1)
    del D, W0, H
    codes = W if perm is None else W[:, torch.argsort(perm)]
    g_idx = (torch.arange(cols, device=W.device) // gs).int()
    r = QuantResult(codes.to(torch.int32), scales, zeros.int(), g_idx, grid)
    r.row_stats = (num, den)
    r.error = float(num.sum() / den.sum().clamp_min(1e-20))
    return r


def split_rows(r: QuantResult, sizes: list[int]) -> list[QuantResult]:
    """One stacked solve (linears sharing an input) back into one result per linear."""
    out, start = [], 0
    num, den = r.row_stats
    for n in sizes:
        sl = slice(start, start + n)
        # own copies: checkpoint writers refuse tensors that share storage (e.g. one g_idx for q/k/v)
        part = QuantResult(r.codes[sl].clone(), r.scales[sl].clone(), r.zeros[sl].clone(), r.g_idx.clone(), r.grid)
        part.error = float(num[sl].sum() / den[sl].sum().clamp_min(1e-20))
        out.append(part)
        start += n
    return out
