"""Model loading and the Qwen family registry."""

from qwen_quant.models.loader import check_model, load_config, load_model, load_tokenizer, pick_device, resolve_model
from qwen_quant.models.registry import FAMILIES, QWEN2, QWEN_V1, ModelInfo, QwenFamily, detect_family, model_info

__all__ = ["FAMILIES", "QWEN2", "QWEN_V1", "ModelInfo", "QwenFamily", "check_model", "detect_family", "load_config",
           "load_model", "load_tokenizer", "model_info", "pick_device", "resolve_model"]
