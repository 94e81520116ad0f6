"""qwen2_moe: Qwen1.5-MoE-A2.7B and Qwen2-57B-A14B (transformers' ``Qwen2MoeForCausalLM``).

The attention block is qwen2's (q/k/v bias). The MLP of a sparse layer is 60 or 64 routed experts
(top-4 or top-8) behind the router ``mlp.gate``, plus one shared expert whose output is scaled by
its own sigmoid gate ``mlp.shared_expert_gate`` (a [1, hidden] linear). A layer is sparse when it is
not in ``mlp_only_layers`` and ``(layer + 1) % decoder_sparse_step == 0`` (transformers'
Qwen2MoeDecoderLayer); the others keep a dense ``mlp.{gate,up,down}_proj`` of ``intermediate_size``.

transformers 5 fuses the experts in memory (``mlp.experts.gate_up_proj`` [E, 2I, H] and
``down_proj`` [E, H, I]) and keeps them per expert on disk (``mlp.experts.{e}.gate_proj.weight``),
which is the layout Qwen's GPTQ-Int4 release and every runtime read; the tables below name the
on-disk linears. Router and shared-expert gate stay in full precision, as in Qwen's releases.
"""

from qwen_quant.models.family import Family, GGUFNames, MoE, ScalePair, attention_shapes, mlp_shapes
from qwen_quant.models.families import qwen2


def sparse_layer(config: dict, layer: int) -> bool:
    step = config.get("decoder_sparse_step") or 1
    return (layer not in (config.get("mlp_only_layers") or [])
            and (config.get("num_experts") or config.get("num_local_experts") or 0) > 0 and (layer + 1) % step == 0)


EXPERT_IN = ("mlp.experts.#.gate_proj", "mlp.experts.#.up_proj")
SHARED_IN = ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")
MLP = (
    ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",),           # dense layers
    EXPERT_IN, SHARED_IN, ("mlp.experts.#.down_proj",), ("mlp.shared_expert.down_proj",),
)

MOE = MoE(shared_expert="mlp.shared_expert", shared_expert_gate="mlp.shared_expert_gate",
          shared_intermediate_key="shared_expert_intermediate_size", sparse=sparse_layer)


def linear_shapes(c: dict) -> dict[str, tuple[int, int]]:
    return {**attention_shapes(c), **mlp_shapes(c), **mlp_shapes(c, "mlp.experts.#", "moe_intermediate_size"),
            **mlp_shapes(c, "mlp.shared_expert", "shared_expert_intermediate_size")}


# One scale per input channel of the normed MLP input: every expert and the shared expert read it,
# so they share the post_attention_layernorm scale (the fold into the norm is exact only then); the
# router and the shared-expert gate read it too and take the scale unquantized.
MLP_PAIRS = (
    ScalePair("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScalePair("mlp.up_proj", ("mlp.down_proj",)),
    ScalePair("post_attention_layernorm", EXPERT_IN + SHARED_IN, "mlp", also=("mlp.gate", "mlp.shared_expert_gate")),
    ScalePair("mlp.experts.#.up_proj", ("mlp.experts.#.down_proj",)),
    ScalePair("mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",)),
)

def gguf_params(writer, config: dict) -> None:
    """The keys convert_hf_to_gguf.py's ``Qwen2MoeModel.set_gguf_parameters`` adds (also Qwen3MoeModel's)."""
    if (n := config.get("moe_intermediate_size")) is not None:
        writer.add_expert_feed_forward_length(n)
    if (n := config.get("shared_expert_intermediate_size")) is not None:
        writer.add_expert_shared_feed_forward_length(n)


FAMILY = Family(
    name="qwen2_moe",
    description="Qwen1.5-MoE / Qwen2-MoE (transformers Qwen2MoeForCausalLM)",
    model_types=("qwen2_moe",),
    architectures=("Qwen2MoeForCausalLM",),
    linear_groups=qwen2.ATTENTION + MLP,
    linear_shapes=linear_shapes,
    full_precision=("mlp.gate", "mlp.shared_expert_gate"),
    scale_pairs=qwen2.ATTENTION_PAIRS + MLP_PAIRS,
    moe=MOE,
    qkv_bias=True,
    gguf=GGUFNames(arch="QWEN2MOE", pre=qwen2.GGUF_PRE, params=gguf_params, dense_layers=False),
    onnx_type=None,
    onnx_hint="onnxruntime-genai's model builder has no Qwen Mixture-of-Experts model type; use GGUF or a GPTQ/AWQ checkpoint",
)
