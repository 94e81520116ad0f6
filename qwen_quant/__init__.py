"""qwen-quant: quantize and export Qwen checkpoints, and validate every artifact against the reference."""

__version__ = "0.1.0"
