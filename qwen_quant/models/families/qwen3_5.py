"""qwen3_5: the dense Qwen3.5 models, hybrid linear-attention (transformers' ``Qwen3_5ForCausalLM``
for the text model, ``Qwen3_5ForConditionalGeneration`` for the released multimodal checkpoints).

Layers mix two token mixers (``layer_types``; without it every ``full_attention_interval``-th,
default 4th, layer is full attention):
- ``linear_attention``: a Gated DeltaNet, ``linear_attn.*``. ``in_proj_qkv`` and ``in_proj_z`` read
  the normed hidden state (one Hessian, one group); ``in_proj_qkv``'s output goes through a short
  depthwise causal ``conv1d`` into the chunked/recurrent delta rule; ``in_proj_b`` (sigmoid -> beta)
  and ``in_proj_a`` (with ``A_log``/``dt_bias`` -> the per-head decay) give one value per value head;
  a gated RMSNorm (``norm``, gate = ``in_proj_z``'s output) feeds ``out_proj``.
- ``full_attention``: Qwen3's attention (qk-norm, no bias) with an output gate: ``q_proj`` writes
  the query and a sigmoid gate per head (2 x heads x head_dim rows); partial rotary
  (``partial_rotary_factor`` 0.25) and interleaved M-RoPE sections, both inside transformers'
  rotary module.

Kept in full precision, as Qwen's own FP8 releases do (their ``modules_to_not_convert`` list
``linear_attn.in_proj_a``/``in_proj_b``/``conv1d``/``A_log``/``dt_bias``/``norm``, the norms and
the vision tower): ``in_proj_b``/``in_proj_a`` have one output row per value head (32 on the
released sizes), too few rows for the 4-bit kernels' tiles (Marlin wants 64) and they drive the
recurrence's decay and write strength directly; conv1d is a depthwise filter, not a linear.

The multimodal checkpoint keeps the text model under ``model.language_model`` and the vision tower
under ``model.visual`` (MTP weights, where a release has them, under ``mtp.``). Only the text
model's decoder linears are quantized; every other tensor is copied byte for byte.

Every RMSNorm here computes ``x * (1 + weight)`` (``norm_offset``), which AWQ's fold must respect.

GGUF: llama.cpp's ``qwen35`` architecture, written as its converter writes it (tensor transforms and
keys in `deltanet_gguf`); the text GGUF of a multimodal checkpoint leaves out the vision tower and
the MTP head.
"""

from dataclasses import replace

from qwen_quant.models.family import Family, GGUFNames, ScalePair, attention_shapes, mlp_shapes
from qwen_quant.models.families import deltanet_gguf, qwen2

MIXERS = (("linear_attention", "linear_attn"), ("full_attention", "self_attn"))
# AWQ folds, each exact (tests/test_hybrid_awq.py): input_layernorm -> the Gated DeltaNet's input projections
# (in_proj_b/a read the same normed input and take the scale unquantized); input_layernorm -> q/k/v (q_proj's
# gate rows included); v -> o where K/V heads are not shared: the output gate multiplies the attention output
# per channel, so it commutes with a per-channel scale; the MLP's as qwen2's. Not a fold: the gated RMSNorm
# -> out_proj (its weight has head_v_dim entries shared by every value head, out_proj's input is per head).
LINEAR_PAIRS = (ScalePair("input_layernorm", ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z"), "linear_attn",
                          also=("linear_attn.in_proj_b", "linear_attn.in_proj_a")),)
ATTENTION_PAIRS = LINEAR_PAIRS + qwen2.ATTENTION_PAIRS
LINEAR_ATTENTION = (("linear_attn.in_proj_qkv", "linear_attn.in_proj_z"), ("linear_attn.out_proj",))
LINEAR_FULL_PRECISION = ("linear_attn.in_proj_b", "linear_attn.in_proj_a")
GGUF = GGUFNames(arch="QWEN35", pre=qwen2.GGUF_PRE, params=deltanet_gguf.qwen35_params,
                 tensors=deltanet_gguf.qwen35_tensors, skip=deltanet_gguf.SKIP)
ONNX_HINT = ("onnxruntime-genai's model builder has no Gated DeltaNet (linear-attention) layer; "
             "serve a GPTQ/AWQ checkpoint with vLLM or transformers instead")


def gated_attention_shapes(c: dict) -> dict[str, tuple[int, int]]:
    """qwen3's attention shapes, with ``q_proj`` writing the query and the output gate."""
    s = attention_shapes(c)
    i, o = s["self_attn.q_proj"]
    return {**s, "self_attn.q_proj": (i, 2 * o)}


def linear_attention_shapes(c: dict) -> dict[str, tuple[int, int]]:
    h = c["hidden_size"]
    k = c["linear_key_head_dim"] * c["linear_num_key_heads"]
    v = c["linear_value_head_dim"] * c["linear_num_value_heads"]
    nv = c["linear_num_value_heads"]
    return {"linear_attn.in_proj_qkv": (h, 2 * k + v), "linear_attn.in_proj_z": (h, v),
            "linear_attn.in_proj_b": (h, nv), "linear_attn.in_proj_a": (h, nv), "linear_attn.out_proj": (v, h)}


TEXT = Family(
    name="qwen3_5_text",
    description="Qwen3.5 text model, hybrid linear attention (transformers Qwen3_5ForCausalLM)",
    model_types=("qwen3_5_text",),
    architectures=("Qwen3_5ForCausalLM",),
    linear_groups=LINEAR_ATTENTION + qwen2.ATTENTION + qwen2.MLP,
    linear_shapes=lambda c: {**linear_attention_shapes(c), **gated_attention_shapes(c), **mlp_shapes(c)},
    full_precision=LINEAR_FULL_PRECISION,
    scale_pairs=ATTENTION_PAIRS + qwen2.MLP_PAIRS,
    qkv_bias=False,
    qk_norm=True,
    mixers=MIXERS,
    norm_offset=1.0,
    gguf=GGUF,
    onnx_type=None,
    onnx_hint=ONNX_HINT,
)

FAMILY = replace(
    TEXT,
    name="qwen3_5",
    description="Qwen3.5 multimodal, hybrid linear attention (transformers Qwen3_5ForConditionalGeneration)",
    model_types=("qwen3_5",),
    architectures=("Qwen3_5ForConditionalGeneration",),
    layers_path="model.language_model.layers",
    embed_path="model.language_model.embed_tokens",
    norm_path="model.language_model.norm",
    rotary_path="model.language_model.rotary_emb",
    text_config_key="text_config",
    checkpoint_prefix=("model.language_model.", "model."),
)
