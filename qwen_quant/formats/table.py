"""The format table: one entry per on-disk quantized format, asked by everything that reads one.

A checkpoint's ``quantization_config`` names its format by ``quant_method``, and a few more fields
change how its tensors decode (GPTQ's ``checkpoint_format``, AWQ's ``version``, whether a
compressed-tensors config holds integer or float8 weights). `detect` reads those fields once and
gives the `Format` entry; the loader, the streamed evaluator, the integrity checks, the vLLM backend
and the gate ask the entry for what they need (how a linear dequantizes, its bits and group size,
how the model loads densely, the artifact class, vLLM's default dtype) instead of branching on
``quant_method`` strings. A layout we do not read (GPTQ v2 zero points, AWQ GEMV, bitsandbytes, ...)
is refused here, in one line, before anything heavy runs.

The packers and ``quantization_config`` writers stay in the per-format modules (`gptq`, `awq`, `ct`,
`fp8`); the entries point at them. The table itself is written here because no library offers one
that spans AutoGPTQ's, AutoAWQ's, compressed-tensors' and Qwen's FP8 layouts together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from qwen_quant.errors import QuantError


@dataclass(frozen=True)
class Format:
    """One on-disk format.

    ``name``: what reports and errors call it. ``quant_method``: the config's value.
    ``packed``: the tensor suffix that marks a packed linear (``qweight``, ``weight_packed``), or None
    where the weight keeps its name (FP8). ``load``: how a dense model is built for validation:
    ``"unpack"`` (our unpackers, `formats.load_dequantized`), ``"w8a8"`` (`formats.fp8.load_w8a8`,
    FP8 weights with dynamic activation quantization) or ``"transformers"`` (transformers'
    compressed-tensors integration, dequantizing at load). ``vllm_dtype``: vLLM's default compute dtype.
    """

    name: str
    quant_method: str
    packed: str | None
    load: str
    vllm_dtype: str
    _dequantize: Callable | None = None
    _bits: Callable[[dict], tuple[int, int]] | None = None

    def bits_group(self, qc: dict) -> tuple[int, int]:
        """(weight bits, group size; -1 = per channel) the config declares."""
        return self._bits(qc)

    def artifact_class(self, qc: dict) -> str:
        """The gate's class of the artifact: fp8, 8bit, 4bit or low."""
        if self.name == "fp8":
            return "fp8"
        bits = self.bits_group(qc)[0]
        return "8bit" if bits >= 8 else "4bit" if bits >= 4 else "low"

    def is_packed(self, store, base: str) -> bool:
        """Whether linear ``base`` is stored packed in ``store`` (a `WeightStore` or a dict of tensors)."""
        return self.packed is not None and f"{base}.{self.packed}" in store

    def dequantize(self, store, base: str, qc: dict) -> torch.Tensor:
        """The dense float32 weight [out, in] of packed linear ``base``."""
        if self._dequantize is None:
            raise QuantError(f"{self.name} weights are not packed linears; load the checkpoint with its loader")
        return self._dequantize(store, base, qc)


def _tensors(store, base: str) -> dict[str, torch.Tensor]:
    names = store.names(base + ".") if hasattr(store, "names") else [k for k in store if k.startswith(base + ".")]
    return {k: (store.get(k) if hasattr(store, "get") and not isinstance(store, dict) else store[k]) for k in names}


def _gptq_dequantize(store, base: str, qc: dict) -> torch.Tensor:
    from qwen_quant.formats.gptq import dequantize

    return dequantize(_tensors(store, base), base, int(qc["bits"]))


def _awq_dequantize(store, base: str, qc: dict) -> torch.Tensor:
    from qwen_quant.formats.awq import dequantize

    return dequantize(_tensors(store, base), base, int(qc["bits"]))


def _ct_dequantize(store, base: str, qc: dict) -> torch.Tensor:
    """A compressed-tensors pack-quantized linear, unpacked by the compressed-tensors library itself."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    scheme = QuantizationScheme(**next(iter(qc["config_groups"].values())))
    data = {k[len(base) + 1:]: v for k, v in _tensors(store, base).items() if not k.endswith(".bias")}
    return PackedQuantizationCompressor.decompress(data, scheme)["weight"].float()


def _classic_bits(qc: dict) -> tuple[int, int]:
    return int(qc.get("bits") or 16), int(qc.get("group_size") or -1)


def _ct_weights(qc: dict) -> dict:
    return next(iter((qc.get("config_groups") or {}).values()), {}).get("weights") or {}


def _ct_bits(qc: dict) -> tuple[int, int]:
    w = _ct_weights(qc)
    return int(w.get("num_bits") or 8), int(w.get("group_size") or -1)


def _fp8_bits(qc: dict) -> tuple[int, int]:
    if qc.get("quant_method") == "fp8":
        return 8, int((qc.get("weight_block_size") or [128, 128])[1])
    w = _ct_weights(qc)
    block = w.get("block_structure") if w.get("strategy") == "block" else None
    return 8, int(block[1]) if block else -1


GPTQ = Format("gptq", "gptq", "qweight", "unpack", "float16", _gptq_dequantize, _classic_bits)
AWQ = Format("awq", "awq", "qweight", "unpack", "float16", _awq_dequantize, _classic_bits)
CT_INT = Format("compressed-tensors", "compressed-tensors", "weight_packed", "transformers", "bfloat16",
                _ct_dequantize, _ct_bits)
FP8 = Format("fp8", "fp8", None, "w8a8", "bfloat16", None, _fp8_bits)
FORMATS = (GPTQ, AWQ, CT_INT, FP8)


def quantization_config_of(config: dict | None) -> dict:
    """The ``quantization_config`` of a config.json dict (or the block itself when given one)."""
    config = config or {}
    if "quant_method" in config:
        return config
    qc = config.get("quantization_config")
    if qc is None and isinstance(config.get("text_config"), dict):  # a multimodal checkpoint's text model
        qc = config["text_config"].get("quantization_config")
    return qc or {}


def detect(config: dict | None, where: str = "config.json") -> Format | None:
    """The format of a checkpoint from its config.json dict; None for a full-precision checkpoint.

    Raises QuantError, in one line that says what to do, for a layout we do not read.
    """
    qc = quantization_config_of(config)
    method = qc.get("quant_method")
    if not method:
        return None
    if method == "gptq":
        cf = qc.get("checkpoint_format") or "gptq"
        if cf != "gptq":
            raise QuantError(f"{where}: GPTQ checkpoint_format {cf!r} is not read (its zero points are stored "
                             "differently); convert it to the classic 'gptq' layout with GPTQModel, or quantize the "
                             "full-precision model with qwen-quant gptq")
        return GPTQ
    if method == "awq":
        version = str(qc.get("version") or "gemm").lower()
        if version != "gemm":
            raise QuantError(f"{where}: AWQ version {version!r} is not read (only the GEMM layout that "
                             "transformers and vLLM load); re-quantize with qwen-quant awq")
        return AWQ
    if method == "fp8":
        return FP8
    if method == "compressed-tensors":
        from qwen_quant.formats.fp8 import is_fp8

        if is_fp8(qc):
            return FP8
        w = _ct_weights(qc)
        fmt = qc.get("format") or next(iter((qc.get("config_groups") or {}).values()), {}).get("format")
        if w.get("type", "int") != "int" or fmt not in (None, "pack-quantized"):
            raise QuantError(f"{where}: compressed-tensors format {fmt!r} with {w.get('type')} weights is not read; "
                             "qwen-quant reads pack-quantized integer (W4A16/W8A16) and FP8 checkpoints")
        return CT_INT
    raise QuantError(f"{where}: quant_method {method!r} is not a format qwen-quant reads (gptq, awq, "
                     "compressed-tensors, fp8); validate the full-precision model, or quantize it with qwen-quant")


def by_name(name: str) -> Format:
    for f in FORMATS:
        if f.name == name:
            return f
    raise QuantError(f"unknown format {name!r}; use one of {', '.join(f.name for f in FORMATS)}")
