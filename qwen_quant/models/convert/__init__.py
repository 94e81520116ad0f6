"""Checkpoint conversions into the qwen2 layout every other qwen-quant command takes (today: Qwen v1)."""

from qwen_quant.models.convert.qwen_v1 import ConvertConfig, convert_qwen_v1, is_qwen_v1

__all__ = ["ConvertConfig", "convert_qwen_v1", "is_qwen_v1"]
