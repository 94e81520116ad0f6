"""Every Qwen family qwen-quant knows, one file each; `FAMILIES` is the order detection tries them."""

from qwen_quant.models.families import qwen2, qwen3, qwen_v1

FAMILIES = (qwen2.FAMILY, qwen3.FAMILY, qwen_v1.FAMILY)

__all__ = ["FAMILIES"]
