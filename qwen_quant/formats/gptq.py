"""The classic GPTQ checkpoint layout (AutoGPTQ / Qwen's -GPTQ-Int4 releases, checkpoint_format "gptq").

Per quantized linear ``L`` with in-features ``I``, out-features ``O``, ``G`` groups:
- ``L.qweight`` int32 [I * bits / 32, O]: codes packed along the input axis;
- ``L.qzeros``  int32 [G, O * bits / 32]: ``zero - 1`` packed along the output axis;
- ``L.scales``  float16 [G, O];
- ``L.g_idx``   int32 [I]: group of each input column;
- ``L.bias``    float16 [O] when the linear has a bias (q/k/v in Qwen2).
transformers (with a GPTQ kernel package), vLLM and SGLang read this layout. `load_dequantized`
turns such a checkpoint back into a dense transformers model, so validation needs no GPU kernel.
"""

from __future__ import annotations

import numpy as np
import torch

from qwen_quant.formats.bitpack import pack_bits_torch, unpack_bits
from qwen_quant.quantize.grid import QuantResult


def pack(name: str, r: QuantResult, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Packed tensors of one linear, on the device ``r`` lives on (the driver moves a layer to the host once)."""
    bits, maxq = r.grid.bits, r.grid.maxq
    out = {
        f"{name}.qweight": pack_bits_torch(r.codes.T, bits, dim=0),
        f"{name}.qzeros": pack_bits_torch((r.zeros.T.to(torch.int64) - 1) & maxq, bits, dim=1),
        f"{name}.scales": r.scales.T.contiguous().to(torch.float16),
        f"{name}.g_idx": r.g_idx.to(torch.int32),
    }
    if bias is not None:
        out[f"{name}.bias"] = bias.detach().to(torch.float16)
    return out


def unpack(tensors: dict[str, torch.Tensor], name: str, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(codes [O, I], zeros [O, G], scales [O, G] float32, g_idx [I]) of linear ``name``."""
    codes = unpack_bits(tensors[f"{name}.qweight"].numpy(), bits, axis=0).T
    zeros = (unpack_bits(tensors[f"{name}.qzeros"].numpy(), bits, axis=1) + 1).T  # stored as zero - 1
    scales = tensors[f"{name}.scales"].float().numpy().T
    return codes, zeros, scales, tensors[f"{name}.g_idx"].numpy()


def dequantize(tensors: dict[str, torch.Tensor], name: str, bits: int) -> torch.Tensor:
    codes, zeros, scales, g_idx = unpack(tensors, name, bits)
    g = g_idx.astype(np.int64)
    return torch.from_numpy(scales[:, g] * (codes - zeros[:, g]).astype(np.float32))


def quantization_config(bits: int, group_size: int, desc_act: bool, sym: bool, damp: float,
                        true_sequential: bool = True) -> dict:
    """The config.json block Qwen's GPTQ releases carry (read by transformers/optimum, vLLM, SGLang)."""
    return {"bits": bits, "group_size": group_size, "damp_percent": damp, "desc_act": desc_act,
            "static_groups": desc_act, "sym": sym, "true_sequential": true_sequential, "model_name_or_path": None,
            "model_file_base_name": "model", "quant_method": "gptq", "checkpoint_format": "gptq"}
