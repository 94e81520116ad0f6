"""Tiny random checkpoints of the hybrid linear-attention Qwen families, saved by transformers' own
classes (Qwen3NextForCausalLM, Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration,
Qwen3_5MoeForCausalLM) with the real tokenizer copied in: 4 layers (3 Gated DeltaNet + 1 gated
full attention), GQA, partial rotary, the real vocabulary at width 64."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

TEXT = dict(vocab_size=151936, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=32,
            linear_value_head_dim=32, linear_conv_kernel_dim=4, intermediate_size=128, max_position_embeddings=512)
VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
# Qwen3.5's interleaved M-RoPE sections count rotary pairs: the released [11, 11, 10] fill head_dim 256 x 0.25;
# head_dim 16 x 0.25 has two pairs (llama.cpp asserts the sections fit the head).
ROPE_35 = dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25, mrope_section=[1, 1, 0],
               mrope_interleaved=True)
KINDS = ("qwen3_next", "qwen3_5_text", "qwen3_5", "qwen3_5_moe_text")


EXPERTS = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)


def _model(kind: str, tied: bool, mtp: bool, experts: bool = False):
    import transformers as tf

    if kind == "qwen3_next":  # by default a dense MLP in every layer (num_experts 0): the Gated DeltaNet path alone
        moe = EXPERTS if experts else dict(num_experts=0)
        return tf.Qwen3NextForCausalLM(tf.Qwen3NextConfig(**TEXT, **moe, tie_word_embeddings=tied))
    if kind == "qwen3_5_text":
        return tf.Qwen3_5ForCausalLM(tf.Qwen3_5TextConfig(**TEXT, rope_parameters=ROPE_35, tie_word_embeddings=tied))
    if kind == "qwen3_5":
        return tf.Qwen3_5ForConditionalGeneration(tf.Qwen3_5Config(text_config={**TEXT, "rope_parameters": ROPE_35},
                                                                   vision_config=VISION, tie_word_embeddings=tied))
    moe = {k: v for k, v in TEXT.items() if k != "intermediate_size"}
    return tf.Qwen3_5MoeForCausalLM(tf.Qwen3_5MoeTextConfig(**moe, **EXPERTS, rope_parameters=ROPE_35,
                                                            tie_word_embeddings=tied))


def build(kind: str, out: Path, tokenizer_dir: Path, tied: bool = False, mtp: bool = False, seed: int = 0,
          experts: bool = False) -> Path:
    """Save a random ``kind`` checkpoint at ``out``; ``mtp`` adds Qwen-style ``mtp.*`` tensors beside it
    (transformers does not build the MTP head; released checkpoints carry it and loaders skip it);
    ``experts`` gives qwen3_next routed experts and a shared expert in every layer, as the released model has."""
    torch.manual_seed(seed)
    model = _model(kind, tied, mtp, experts)
    with torch.no_grad():  # random norms and decays (transformers initialises them to identity / constants)
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "A_log", "dt_bias")):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja"):
        if (tokenizer_dir / f).exists():
            shutil.copy(tokenizer_dir / f, out / f)
    if mtp:
        from safetensors.torch import load_file, save_file

        sd = load_file(out / "model.safetensors")
        g = torch.Generator().manual_seed(seed + 1)
        sd["mtp.fc.weight"] = torch.randn(64, 128, generator=g).to(torch.bfloat16)
        sd["mtp.norm.weight"] = torch.randn(64, generator=g).to(torch.bfloat16)
        save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    return out
