"""qwen-quant: quantize and export Qwen checkpoints, and validate every artifact against the reference."""

from qwen_quant._native import promote_libstdcxx as _promote_libstdcxx

_promote_libstdcxx()  # before torch and llama.cpp load: see qwen_quant/_native.py

__version__ = "0.1.0"
