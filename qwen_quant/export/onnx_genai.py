"""Files next to model.onnx so the folder runs as-is: tokenizer, generation config, genai_config.json.

``genai_config.json`` follows what onnxruntime-genai's own model builder writes for qwen2, with the
input/output names of our graph spelled out (genai maps them by these templates, so an optimum-style
graph runs without renaming). ``past_present_share_buffer`` is false: our presents are past+new
concatenated, not written into a preallocated max-length buffer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "qwen.tiktoken")
COPY_FILES = TOKENIZER_FILES + ("config.json", "generation_config.json")


def _first(v):
    return v[0] if isinstance(v, list) and v else v


def genai_config(hf_cfg: dict[str, Any], gen_cfg: dict[str, Any], model_file: str) -> dict[str, Any]:
    from qwen_quant.models.registry import detect_family

    family = detect_family(hf_cfg)
    n_heads = hf_cfg["num_attention_heads"]
    head_size = hf_cfg.get("head_dim") or hf_cfg["hidden_size"] // n_heads
    context = hf_cfg.get("max_position_embeddings", 32768)
    eos = gen_cfg.get("eos_token_id", hf_cfg.get("eos_token_id"))
    bos = gen_cfg.get("bos_token_id", hf_cfg.get("bos_token_id"))
    pad = gen_cfg.get("pad_token_id", hf_cfg.get("pad_token_id"))
    if pad is None:
        pad = _first(eos)
    return {
        "model": {
            "bos_token_id": bos if bos is not None else _first(eos),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": model_file,
                "head_size": head_size,
                "hidden_size": hf_cfg["hidden_size"],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": n_heads,
                "num_hidden_layers": hf_cfg["num_hidden_layers"],
                "num_key_value_heads": hf_cfg.get("num_key_value_heads", n_heads),
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": family.onnx_type,
            "vocab_size": hf_cfg["vocab_size"],
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": bool(gen_cfg.get("do_sample", False)),
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": gen_cfg.get("repetition_penalty", 1.0),
            "temperature": gen_cfg.get("temperature", 1.0),
            "top_k": gen_cfg.get("top_k") or 50,
            "top_p": gen_cfg.get("top_p") or 1.0,
        },
    }


def write_runtime_files(src: Path, dst: Path, hf_cfg: dict[str, Any], model_file: str) -> None:
    """Copy tokenizer/config files from the checkpoint and write genai_config.json."""
    for name in COPY_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    gen_path = src / "generation_config.json"
    gen_cfg = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    if not gen_path.exists():
        keep = {k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_cfg.get(k) is not None}
        (dst / "generation_config.json").write_text(json.dumps(keep, indent=2) + "\n")
    (dst / "genai_config.json").write_text(json.dumps(genai_config(hf_cfg, gen_cfg, model_file), indent=2) + "\n")
