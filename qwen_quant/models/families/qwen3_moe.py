"""qwen3_moe: Qwen3-30B-A3B and Qwen3-235B-A22B (transformers' ``Qwen3MoeForCausalLM``).

The attention block is qwen3's (no q/k/v bias, q/k RMSNorm, explicit ``head_dim``). Sparse layers
hold 128 routed experts (top-8, ``norm_topk_prob``) behind the router ``mlp.gate`` and no shared
expert; ``decoder_sparse_step``/``mlp_only_layers`` pick dense layers as in qwen2_moe. Experts are
fused in memory and per expert on disk (see qwen2_moe). The router stays in full precision.
"""

from qwen_quant.models.family import Family, GGUFNames, MoE, ScalePair, attention_shapes, mlp_shapes
from qwen_quant.models.families import qwen2, qwen2_moe

EXPERT_IN = qwen2_moe.EXPERT_IN
MLP = (("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",), EXPERT_IN, ("mlp.experts.#.down_proj",))

MOE = MoE(sparse=qwen2_moe.sparse_layer)

MLP_PAIRS = (
    ScalePair("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScalePair("mlp.up_proj", ("mlp.down_proj",)),
    ScalePair("post_attention_layernorm", EXPERT_IN, "mlp", also=("mlp.gate",)),
    ScalePair("mlp.experts.#.up_proj", ("mlp.experts.#.down_proj",)),
)

FAMILY = Family(
    name="qwen3_moe",
    description="Qwen3-MoE (transformers Qwen3MoeForCausalLM)",
    model_types=("qwen3_moe",),
    architectures=("Qwen3MoeForCausalLM",),
    linear_groups=qwen2.ATTENTION + MLP,
    linear_shapes=lambda c: {**attention_shapes(c), **mlp_shapes(c),
                             **mlp_shapes(c, "mlp.experts.#", "moe_intermediate_size")},
    full_precision=("mlp.gate",),
    scale_pairs=qwen2.ATTENTION_PAIRS + MLP_PAIRS,
    moe=MOE,
    qkv_bias=False,
    qk_norm=True,
    gguf=GGUFNames(arch="QWEN3MOE", pre=qwen2.GGUF_PRE, params=qwen2_moe.gguf_params, dense_layers=False),
    onnx_type=None,
    onnx_hint=qwen2_moe.FAMILY.onnx_hint,
)
