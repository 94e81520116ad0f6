"""Qwen v1 (Qwen-7B/14B/72B and -Chat: remote-code ``QWenLMHeadModel``, ``qwen.tiktoken``).

Recognised so that commands can say what to do: every command but ``convert`` takes the qwen2
checkpoint that ``qwen-quant convert`` writes from it (`qwen_quant.models.convert`).
"""

from qwen_quant.models.family import Family

FAMILY = Family(
    name="qwen-v1",
    description="Qwen v1 (Qwen-7B/14B/72B, remote-code QWenLMHeadModel, qwen.tiktoken)",
    model_types=("qwen",),
    architectures=("QWenLMHeadModel",),
    layers_path="transformer.h",
    embed_path="transformer.wte",
    norm_path="transformer.ln_f",
    rotary_path="transformer.rotary_emb",
    linear_groups=(("attn.c_attn",), ("attn.c_proj",), ("mlp.w1", "mlp.w2"), ("mlp.c_proj",)),
    supported=False,
    hint="convert it to the qwen2 layout first: qwen-quant convert {path} -o {path}-qwen2",
)
