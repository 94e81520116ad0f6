"""Tiny random checkpoints of qwen3, qwen2_moe and qwen3_moe saved by transformers' own classes with
the real Qwen tokenizer, each with its family's quirks at small width (shared by the MoE test modules)."""

from __future__ import annotations

from pathlib import Path

from qwen_quant.fixtures import tokenizer_dir
from qwen_quant.models.families import qwen2_moe, qwen3, qwen3_moe

TOKENIZER_DIR = tokenizer_dir()  # $QWEN_QUANT_TOKENIZER, else ../shared/fixtures/qwen2-tokenizer
BASE = dict(vocab_size=151936, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6, bos_token_id=151643,
            eos_token_id=151643)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[])
FAMILIES = [qwen3.FAMILY, qwen2_moe.FAMILY, qwen3_moe.FAMILY]
IDS = [f.name for f in FAMILIES]
#: family name -> config.json fields beyond BASE: each family's quirks (qk-norm with head_dim != hidden/heads, shared expert)
CONFIGS = dict(zip(IDS, (
    dict(head_dim=32, tie_word_embeddings=True),
    dict(MOE, shared_expert_intermediate_size=48, tie_word_embeddings=False),
    dict(MOE, head_dim=32, norm_topk_prob=True, tie_word_embeddings=False),
)))


def family_named(name: str):
    return next(f for f in FAMILIES if f.name == name)


def save_tiny(family, out: Path, **overrides) -> Path:
    """A random checkpoint of ``family`` saved by transformers' own class (fp32, real tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.for_model(family.model_types[0], **{**BASE, **CONFIGS[family.name], **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    assert type(model).__name__ == family.architectures[0]
    model.config.dtype = "float32"
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(str(out))
    return out
