"""qwen3: the dense Qwen3 models (transformers' ``Qwen3ForCausalLM``).

What differs from qwen2 is data only: no q/k/v bias, a per-head RMSNorm on q and k before rope
(``q_norm``/``k_norm``, kept in full precision like every norm), and an explicit ``head_dim``
(128 on every size, so the attention width is not hidden/heads). llama.cpp's converter is
``Qwen3Model`` (a ``Qwen2Model`` with MODEL_ARCH.QWEN3).

AWQ's input_layernorm -> q/k/v fold stays exact: the q/k norms act on q and k after the projection,
so scaling the projection's input columns is undone by the layernorm's 1/s exactly as in qwen2.
"""

from dataclasses import replace

from qwen_quant.models.families import qwen2

FAMILY = replace(
    qwen2.FAMILY,
    name="qwen3",
    description="Qwen3 dense (transformers Qwen3ForCausalLM)",
    model_types=("qwen3",),
    architectures=("Qwen3ForCausalLM",),
    qkv_bias=False,
    qk_norm=True,
    gguf=replace(qwen2.FAMILY.gguf, arch="QWEN3"),
    onnx_type="qwen3",
)
