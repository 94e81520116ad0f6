"""Every Qwen family qwen-quant knows, one file each; `FAMILIES` is the order detection tries them."""

from qwen_quant.models.families import qwen2, qwen2_moe, qwen3, qwen3_5, qwen3_5_moe, qwen3_moe, qwen3_next, qwen_v1

FAMILIES = (qwen2.FAMILY, qwen3.FAMILY, qwen2_moe.FAMILY, qwen3_moe.FAMILY, qwen3_next.FAMILY,
            qwen3_5.TEXT, qwen3_5.FAMILY, qwen3_5_moe.TEXT, qwen3_5_moe.FAMILY, qwen_v1.FAMILY)

__all__ = ["FAMILIES"]
