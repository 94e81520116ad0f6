"""The compressed-tensors "pack-quantized" layout (W4A16 / W8A16), packed by the compressed-tensors library.

We hand the library each linear's dequantized weight with the scale and zero point our quantizer
chose; its own `PackedQuantizationCompressor` re-derives the integer codes and packs them, so the
artifact is exactly what llm-compressor would write for the same grid. Our codes ``q`` in [0, maxq]
with zero ``z`` map to the library's signed codes ``q - 2^(bits-1)`` with zero point ``z - 2^(bits-1)``.
"""

from __future__ import annotations

import torch

from qwen_quant.quantize.grid import QuantResult


def scheme(bits: int, group_size: int, sym: bool):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    strategy = "channel" if group_size == -1 else "group"
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy=strategy,
                            group_size=None if group_size == -1 else group_size, dynamic=False)
    return QuantizationScheme(targets=["Linear"], weights=args)


def pack(name: str, r: QuantResult, bias: torch.Tensor | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    g = r.grid
    half = 2 ** (g.bits - 1)
    state = {"weight": r.dequant().to(dtype), "weight_scale": r.scales.to(dtype)}
    if not g.sym:
        state["weight_zero_point"] = (r.zeros - half).to(torch.int8)
    packed = PackedQuantizationCompressor.compress(state, scheme(g.bits, g.group_size, g.sym))
    out = {f"{name}.{k}": v for k, v in packed.items()}
    if bias is not None:
        out[f"{name}.bias"] = bias.detach().to(dtype)
    return out


def quantization_config(bits: int, group_size: int, sym: bool, ignore: list[str]) -> dict:
    from compressed_tensors.quantization import QuantizationConfig

    cfg = QuantizationConfig(config_groups={"group_0": scheme(bits, group_size, sym)}, format="pack-quantized",
                             quantization_status="compressed", ignore=ignore)
    d = cfg.model_dump(mode="json")
    d["quant_method"] = "compressed-tensors"
    return d
