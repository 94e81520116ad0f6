"""Model loading and the Qwen families (one file per architecture under `families/`)."""

from qwen_quant.models.family import Family, ScalePair
from qwen_quant.models.loader import check_model, load_config, load_model, load_tokenizer, resolve_model
from qwen_quant.models.registry import FAMILIES, QWEN2, QWEN_V1, ModelInfo, QwenFamily, detect_family, family_named, model_info

__all__ = ["FAMILIES", "QWEN2", "QWEN_V1", "Family", "ModelInfo", "QwenFamily", "ScalePair", "check_model", "detect_family",
           "family_named", "load_config", "load_model", "load_tokenizer", "model_info", "resolve_model"]
