"""qwen3_next: Qwen3-Next-80B-A3B (transformers' ``Qwen3NextForCausalLM``).

The first hybrid linear-attention Qwen: 3 of every 4 layers are a Gated DeltaNet (``linear_attn``),
every 4th is gated full attention (``self_attn``, ``q_proj`` writing query and output gate, qk-norm,
partial rotary 0.25). Its Gated DeltaNet differs from qwen3_5's in two fused projections:
``in_proj_qkvz`` (query, key, value and the norm gate z, interleaved per key head) and
``in_proj_ba`` (beta and the decay input a, one each per value head). ``in_proj_qkvz`` is quantized;
``in_proj_ba`` stays in full precision with conv1d, ``A_log``/``dt_bias`` and the gated norm (Qwen's
Qwen3-Next FP8 release keeps ``in_proj_ba`` unconverted; it has 2 x 32 rows on the 80B).

The MLP of a sparse layer is 512 routed experts (top-10) and a shared expert with its sigmoid gate,
as in qwen2_moe (``decoder_sparse_step``/``mlp_only_layers`` pick dense layers). RMSNorms compute
``x * (1 + weight)``. MTP weights (``mtp.*``) are copied unchanged.

GGUF: llama.cpp's ``qwen3next`` (``in_proj_qkvz`` split into ``attn_qkv`` + ``attn_gate``, see
`deltanet_gguf`); it has experts and a shared expert in every layer, so dense layers are refused.
"""

from dataclasses import replace

from qwen_quant.models.family import Family, ScalePair, mlp_shapes
from qwen_quant.models.families import deltanet_gguf, qwen2, qwen2_moe, qwen3_5

LINEAR_ATTENTION = (("linear_attn.in_proj_qkvz",), ("linear_attn.out_proj",))
# AWQ: qwen3_5's folds with the fused projections (in_proj_ba takes the scale unquantized).
SCALE_PAIRS = (ScalePair("input_layernorm", ("linear_attn.in_proj_qkvz",), "linear_attn", also=("linear_attn.in_proj_ba",)),
               *qwen2.ATTENTION_PAIRS, *qwen2_moe.MLP_PAIRS)


def linear_attention_shapes(c: dict) -> dict[str, tuple[int, int]]:
    h = c["hidden_size"]
    k = c["linear_key_head_dim"] * c["linear_num_key_heads"]
    v = c["linear_value_head_dim"] * c["linear_num_value_heads"]
    nv = c["linear_num_value_heads"]
    return {"linear_attn.in_proj_qkvz": (h, 2 * k + 2 * v), "linear_attn.in_proj_ba": (h, 2 * nv),
            "linear_attn.out_proj": (v, h)}


def linear_shapes(c: dict) -> dict[str, tuple[int, int]]:
    return {**linear_attention_shapes(c), **qwen3_5.gated_attention_shapes(c), **mlp_shapes(c),
            **mlp_shapes(c, "mlp.experts.#", "moe_intermediate_size"),
            **mlp_shapes(c, "mlp.shared_expert", "shared_expert_intermediate_size")}


FAMILY = replace(
    qwen3_5.TEXT,
    name="qwen3_next",
    description="Qwen3-Next, hybrid linear attention + MoE (transformers Qwen3NextForCausalLM)",
    model_types=("qwen3_next",),
    architectures=("Qwen3NextForCausalLM",),
    linear_groups=LINEAR_ATTENTION + qwen2.ATTENTION + qwen2_moe.MLP,
    linear_shapes=linear_shapes,
    full_precision=("linear_attn.in_proj_ba", "mlp.gate", "mlp.shared_expert_gate"),
    scale_pairs=SCALE_PAIRS,
    moe=qwen2_moe.MOE,
    gguf=replace(qwen3_5.GGUF, arch="QWEN3NEXT", params=deltanet_gguf.next_params, tensors=deltanet_gguf.next_tensors,
                 dense_layers=False),
)
