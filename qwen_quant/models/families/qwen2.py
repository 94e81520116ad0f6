"""qwen2: Qwen1.5, Qwen2 and Qwen2.5 (transformers' ``Qwen2ForCausalLM``).

q/k/v carry a bias; GQA on most sizes; tied embeddings on the small ones; the MLP is SwiGLU.
AWQ's scalings are AutoAWQ's ``Qwen2AWQForCausalLM.get_layers_for_scaling``; the GGUF side is
llama.cpp's ``Qwen2Model`` in convert_hf_to_gguf.py.
"""

from qwen_quant.models.family import Family, GGUFNames, Padding, ScalePair, attention_shapes, mlp_shapes

ATTENTION = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",))
MLP = (("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))

ATTENTION_PAIRS = (
    ScalePair("input_layernorm", ATTENTION[0], "self_attn", attention=True),
    ScalePair("self_attn.v_proj", ATTENTION[1], exact_with_gqa=False),
)
MLP_PAIRS = (
    ScalePair("post_attention_layernorm", MLP[0], "mlp"),
    ScalePair("mlp.up_proj", MLP[1]),
)
MLP_PADDING = Padding("intermediate_size", rows=MLP[0], cols=MLP[1])

# Hashes of convert_hf_to_gguf.py's check text that it maps to the "qwen2" pre-tokenizer.
GGUF_PRE = {
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen/Qwen3-Embedding-0.6B
}

FAMILY = Family(
    name="qwen2",
    description="Qwen1.5 / Qwen2 / Qwen2.5 (transformers Qwen2ForCausalLM)",
    model_types=("qwen2",),
    architectures=("Qwen2ForCausalLM",),
    linear_groups=ATTENTION + MLP,
    linear_shapes=lambda c: {**attention_shapes(c), **mlp_shapes(c)},
    scale_pairs=ATTENTION_PAIRS + MLP_PAIRS,
    padding=(MLP_PADDING,),
    qkv_bias=True,
    gguf=GGUFNames(arch="QWEN2", pre=GGUF_PRE),
    onnx_type="qwen2",
)
