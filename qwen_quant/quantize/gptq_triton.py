"""One Triton kernel for GPTQ's column loop over a block of 128 columns (CUDA only).

The eager loop in `gptq.py` launches about a dozen small kernels per column; on a GPU that launch
overhead, not arithmetic, is what the solve costs (~23k columns per Qwen1.5-7B layer). Rows are
independent given H^-1, so one program keeps a tile of rows x 128 columns in registers and walks the
columns itself: quantize a column, store its code and scaled error, update the columns to its right.
Written here (not imported) because llm-compressor's equivalent is tied to compressed-tensors'
argument types and we pin neither. The arithmetic is the eager loop's, op for op, with explicitly
rounded operations (``enable_fp_fusion=False``: no fused multiply-add; ``tl.div_rn``: IEEE division;
round-half-even by the 1.5 * 2^23 trick) so that the codes match the eager path bit for bit (the
tests run the kernel in Triton's CPU interpreter against the eager loop); `gptq_quantize` falls back to the eager loop if Triton is missing or the kernel fails to build.
Used only when a block has one set of group parameters (group size 128 or a whole row, no act-order).
"""

from __future__ import annotations

import os

import torch

WIDTH = 128
_STATE = {"ok": None}  # None: untried; False: failed once (eager from then on)

try:  # pragma: no cover - needs CUDA (tests run it in Triton's interpreter)
    import triton
    import triton.language as tl

    @triton.jit
    def _rint(x):
        # round half to even (torch.round) for |x| < 2^22, exact in IEEE float32; larger values are
        # clamped to [0, maxq] afterwards either way
        return (x + 12582912.0) - 12582912.0

    @triton.jit
    def _block(w_ptr, q_ptr, e_ptr, h_ptr, s_ptr, z_ptr, rows, ldw, ldq, lde, ldh, maxq,
               WIDTH: tl.constexpr, BR: tl.constexpr):
        r = tl.program_id(0) * BR + tl.arange(0, BR)
        c = tl.arange(0, WIDTH)
        rm = r < rows
        r64 = r.to(tl.int64)
        w = tl.load(w_ptr + r64[:, None] * ldw + c[None, :], mask=rm[:, None], other=0.0)
        s = tl.load(s_ptr + r, mask=rm, other=1.0)
        z = tl.load(z_ptr + r, mask=rm, other=0.0)
        for i in range(WIDTH):
            wi = tl.sum(tl.where(c[None, :] == i, w, 0.0), 1)
            q = _rint(tl.div_rn(wi, s)) + z
            q = tl.minimum(tl.maximum(q, 0.0), maxq)
            d = tl.load(h_ptr + i * ldh + i)
            err = tl.div_rn(wi - s * (q - z), d)
            tl.store(q_ptr + r64 * ldq + i, q, mask=rm)
            tl.store(e_ptr + r64 * lde + i, err, mask=rm)
            h = tl.load(h_ptr + i * ldh + c)
            w = tl.where(c[None, :] > i, w - err[:, None] * h[None, :], w)

    HAVE_TRITON = True
except Exception:  # noqa: BLE001 - no triton
    HAVE_TRITON = False


def usable(W: torch.Tensor, width: int) -> bool:
    return (HAVE_TRITON and W.is_cuda and width == WIDTH and _STATE["ok"] is not False
            and os.environ.get("QWEN_QUANT_NO_TRITON", "0") != "1")


def block_update(W1, Q1, Err1, Hinv1, scale, zero, maxq: int) -> bool:
    """Fill ``Q1`` (codes) and ``Err1`` for one block; False if the kernel is unavailable (use eager)."""
    rows = W1.shape[0]
    W1, Hinv1 = W1.contiguous(), Hinv1.contiguous()
    s, z = scale.float().contiguous(), zero.float().contiguous()
    try:
        _block[(triton.cdiv(rows, 16),)](W1, Q1, Err1, Hinv1, s, z, rows, W1.stride(0), Q1.stride(0), Err1.stride(0),
                                         Hinv1.stride(0), float(maxq), WIDTH=WIDTH, BR=16, num_warps=4,
                                         enable_fp_fusion=False)  # no FMA: products rounded as in eager
    except torch.OutOfMemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - compile/launch failure: eager from now on
        import warnings

        _STATE["ok"] = False
        warnings.warn(f"GPTQ Triton kernel unavailable, using the eager column loop ({err})", RuntimeWarning)
        return False
    _STATE["ok"] = True
    return True
