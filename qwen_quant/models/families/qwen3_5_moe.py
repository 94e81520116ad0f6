"""qwen3_5_moe: the Mixture-of-Experts Qwen3.5 models (transformers' ``Qwen3_5MoeForCausalLM`` for
the text model, ``Qwen3_5MoeForConditionalGeneration`` for the multimodal checkpoints).

The token mixers are qwen3_5's (Gated DeltaNet linear attention and gated full attention, see
that file). Every layer is sparse: routed experts (``num_experts``, top ``num_experts_per_tok``)
behind the router ``mlp.gate`` plus a shared expert scaled by its sigmoid gate
``mlp.shared_expert_gate`` ([1, hidden]). Experts are fused in memory and per expert on disk, as in
qwen2_moe. Router, shared-expert gate, ``in_proj_b``/``in_proj_a``, conv1d, ``A_log``/``dt_bias`` and
the norms stay in full precision (Qwen's FP8 releases list the same modules as not converted).
GGUF: llama.cpp's ``qwen35moe`` (experts in every layer, stacked as in qwen2_moe).
"""

from dataclasses import replace

from qwen_quant.models.family import Family, MoE, mlp_shapes
from qwen_quant.models.families import qwen2_moe, qwen3_5

EXPERTS = (qwen2_moe.EXPERT_IN, qwen2_moe.SHARED_IN, ("mlp.experts.#.down_proj",), ("mlp.shared_expert.down_proj",))
MOE = MoE(shared_expert="mlp.shared_expert", shared_expert_gate="mlp.shared_expert_gate",
          shared_intermediate_key="shared_expert_intermediate_size",
          sparse=lambda config, layer: (config.get("num_experts") or 0) > 0)


def linear_shapes(c: dict) -> dict[str, tuple[int, int]]:
    return {**qwen3_5.linear_attention_shapes(c), **qwen3_5.gated_attention_shapes(c),
            **mlp_shapes(c, "mlp.experts.#", "moe_intermediate_size"),
            **mlp_shapes(c, "mlp.shared_expert", "shared_expert_intermediate_size")}


TEXT = replace(
    qwen3_5.TEXT,
    name="qwen3_5_moe_text",
    description="Qwen3.5-MoE text model, hybrid linear attention (transformers Qwen3_5MoeForCausalLM)",
    model_types=("qwen3_5_moe_text",),
    architectures=("Qwen3_5MoeForCausalLM",),
    linear_groups=qwen3_5.LINEAR_ATTENTION + qwen3_5.qwen2.ATTENTION + EXPERTS,
    linear_shapes=linear_shapes,
    full_precision=qwen3_5.LINEAR_FULL_PRECISION + ("mlp.gate", "mlp.shared_expert_gate"),
    scale_pairs=qwen3_5.ATTENTION_PAIRS + qwen2_moe.MLP_PAIRS,
    moe=MOE,
    gguf=replace(qwen3_5.GGUF, arch="QWEN35MOE", dense_layers=False),
)

FAMILY = replace(
    TEXT,
    name="qwen3_5_moe",
    description="Qwen3.5-MoE multimodal, hybrid linear attention (transformers Qwen3_5MoeForConditionalGeneration)",
    model_types=("qwen3_5_moe",),
    architectures=("Qwen3_5MoeForConditionalGeneration",),
    layers_path=qwen3_5.FAMILY.layers_path,
    embed_path=qwen3_5.FAMILY.embed_path,
    norm_path=qwen3_5.FAMILY.norm_path,
    rotary_path=qwen3_5.FAMILY.rotary_path,
    text_config_key="text_config",
    checkpoint_prefix=qwen3_5.FAMILY.checkpoint_prefix,
)
