"""The AWQ "GEMM" checkpoint layout (AutoAWQ / Qwen's -AWQ releases), as transformers and vLLM read it.

Per quantized linear ``L`` with in-features ``I``, out-features ``O``, ``G`` groups:
- ``L.qweight`` int32 [I, O * bits / 32]: codes packed along the *output* axis;
- ``L.qzeros``  int32 [G, O * bits / 32]: zero points as-is (not minus one), packed the same way;
- ``L.scales``  float16 [G, O];
- ``L.bias``    float16 [O] when the linear has a bias. No ``g_idx``: groups are always static.
Inside each int32 the eight 4-bit codes of output columns ``8k..8k+7`` are interleaved: nibble ``i``
(bits ``4i..4i+3``) holds column ``8k + ORDER[i]`` with ``ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``
(AutoAWQ's ``WQLinear_GEMM.from_linear``; readers undo it with ``[0, 4, 1, 5, 2, 6, 3, 7]``).
The interleave is a column permutation followed by the plain little-endian nibble stream that
`bitpack.pack_bits` already writes, so no second packer is needed. Only 4 bits exist in this
layout (AutoAWQ, transformers and vLLM reject anything else).
"""

from __future__ import annotations

import numpy as np
import torch

from qwen_quant.formats.bitpack import pack_bits_torch, unpack_bits
from qwen_quant.quantize.grid import QuantResult

BITS = 4
ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])  # nibble i of a word holds column ORDER[i] of its block of 8
REVERSE_ORDER = np.argsort(ORDER)  # [0, 4, 1, 5, 2, 6, 3, 7]


def _interleave(a, order):
    """Permute the last axis within consecutive blocks of 8 columns (numpy arrays or torch tensors)."""
    return a.reshape(*a.shape[:-1], -1, 8)[..., order].reshape(a.shape)


def pack(name: str, r: QuantResult, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    if r.grid.bits != BITS:
        raise ValueError(f"the AWQ GEMM layout holds 4-bit codes only, got {r.grid.bits}")
    order = torch.as_tensor(ORDER, device=r.codes.device)
    codes = r.codes.T  # [I, O], on the quantizer's device
    zeros = r.zeros.T  # [G, O]
    out = {
        f"{name}.qweight": pack_bits_torch(_interleave(codes, order), BITS, dim=1),
        f"{name}.qzeros": pack_bits_torch(_interleave(zeros, order), BITS, dim=1),
        f"{name}.scales": r.scales.T.contiguous().to(torch.float16),
    }
    if bias is not None:
        out[f"{name}.bias"] = bias.detach().to(torch.float16)
    return out


def unpack(tensors: dict[str, torch.Tensor], name: str, bits: int = BITS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes [O, I], zeros [O, G], scales [O, G] float32) of linear ``name``."""
    codes = _interleave(unpack_bits(tensors[f"{name}.qweight"].numpy(), bits, axis=1), REVERSE_ORDER).T
    zeros = _interleave(unpack_bits(tensors[f"{name}.qzeros"].numpy(), bits, axis=1), REVERSE_ORDER).T
    scales = tensors[f"{name}.scales"].float().numpy().T
    return codes, zeros, scales


def dequantize(tensors: dict[str, torch.Tensor], name: str, bits: int = BITS) -> torch.Tensor:
    codes, zeros, scales = unpack(tensors, name, bits)
    g = np.arange(codes.shape[1]) // (codes.shape[1] // scales.shape[1])
    return torch.from_numpy(scales[:, g] * (codes - zeros[:, g]).astype(np.float32))


def quantization_config(bits: int, group_size: int, zero_point: bool = True) -> dict:
    """The config.json block AutoAWQ writes and transformers/vLLM read.

    ``zero_point`` is always true on disk: the GEMM layout always carries ``qzeros``, and a
    symmetric grid is written as the constant zero point 2^(bits-1), which every reader handles
    (vLLM's AWQ kernels support only zero_point=true).
    """
    del zero_point
    return {"quant_method": "awq", "version": "gemm", "bits": bits, "group_size": group_size,
            "zero_point": True, "modules_to_not_convert": None}
