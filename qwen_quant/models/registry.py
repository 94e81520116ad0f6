"""The registry of Qwen families: one small table per family, asked by every other module.

A family says how to recognise a checkpoint from its config.json, where the decoder layers live,
which linears a quantizer visits in which order (true-sequential groups: the inputs of a later group
are recomputed after the earlier group is quantized), and which config fields carry the quirks that
matter to exporters (tied embeddings, qkv bias, GQA, rope theta).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_quant.errors import QuantError


@dataclass(frozen=True)
class QwenFamily:
    name: str
    description: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    layers_path: str = "model.layers"
    embed_path: str = "model.embed_tokens"
    norm_path: str = "model.norm"
    lm_head_path: str = "lm_head"
    # Linears of one decoder layer, in quantization order; linears in one group share their input.
    linear_groups: tuple[tuple[str, ...], ...] = ()
    qkv_bias: bool = True
    supported: bool = True
    hint: str = ""  # what to do when the family is recognised but not supported directly


QWEN2 = QwenFamily(
    name="qwen2",
    description="Qwen1.5 / Qwen2 / Qwen2.5 (transformers Qwen2ForCausalLM)",
    model_types=("qwen2",),
    architectures=("Qwen2ForCausalLM",),
    linear_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)

QWEN_V1 = QwenFamily(
    name="qwen-v1",
    description="Qwen v1 (Qwen-7B/14B/72B, remote-code QWenLMHeadModel, qwen.tiktoken)",
    model_types=("qwen",),
    architectures=("QWenLMHeadModel",),
    layers_path="transformer.h",
    embed_path="transformer.wte",
    norm_path="transformer.ln_f",
    linear_groups=(("attn.c_attn",), ("attn.c_proj",), ("mlp.w1", "mlp.w2"), ("mlp.c_proj",)),
    supported=False,
    hint="convert it to the qwen2 layout first: qwen-quant convert {path} -o {path}-qwen2",
)

FAMILIES: tuple[QwenFamily, ...] = (QWEN2, QWEN_V1)


def detect_family(config: dict[str, Any], model_dir: Path | str | None = None, *, allow_unsupported: bool = False) -> QwenFamily:
    """Recognise the family of a checkpoint from its config (and its files, for v1's qwen.tiktoken)."""
    model_type = config.get("model_type", "")
    archs = tuple(config.get("architectures") or ())
    has_tiktoken = model_dir is not None and (Path(model_dir) / "qwen.tiktoken").exists()
    for fam in FAMILIES:
        if model_type in fam.model_types or any(a in fam.architectures for a in archs) or (fam is QWEN_V1 and has_tiktoken):
            if not fam.supported and not allow_unsupported:
                where = str(model_dir) if model_dir is not None else "MODEL"
                raise QuantError(f"{where} is a {fam.description} checkpoint, which this command does not take directly; " + fam.hint.format(path=where))
            return fam
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise QuantError(f"unknown model type {model_type!r} (architectures {list(archs)}): qwen-quant handles Qwen model types {known}; "
                     "pass a Qwen checkpoint folder")


@dataclass(frozen=True)
class ModelInfo:
    """What `qwen-quant info` prints and exporters need: sizes and quirks read from config.json."""

    family: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    rope_theta: float
    rms_norm_eps: float
    tied_embeddings: bool
    qkv_bias: bool
    dtype: str
    params: int = 0
    quantization: dict[str, Any] = field(default_factory=dict)

    @property
    def gqa(self) -> bool:
        return self.num_kv_heads != self.num_heads

    def quirks(self) -> list[str]:
        q = ["tied embeddings" if self.tied_embeddings else "untied lm_head"]
        if self.qkv_bias:
            q.append("qkv bias")
        q.append(f"GQA {self.num_heads}:{self.num_kv_heads}" if self.gqa else "MHA")
        if self.intermediate_size % 1024:
            q.append(f"intermediate {self.intermediate_size} not a multiple of 1024")
        return q


def rope_theta_of(config: dict[str, Any]) -> float:
    """rope theta from either the classic field or transformers 5's rope_parameters."""
    rp = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return float(config.get("rope_theta") or rp.get("rope_theta") or 10000.0)


def model_info(config: dict[str, Any], model_dir: Path | str | None = None) -> ModelInfo:
    fam = detect_family(config, model_dir)
    h, heads = config["hidden_size"], config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    inter, layers, vocab = config["intermediate_size"], config["num_hidden_layers"], config["vocab_size"]
    tied = bool(config.get("tie_word_embeddings", False))
    per_layer = h * heads * head_dim * 2 + h * kv * head_dim * 2 + 3 * h * inter + (heads + 2 * kv) * head_dim + 2 * h
    params = per_layer * layers + vocab * h * (1 if tied else 2) + h
    return ModelInfo(
        family=fam.name, hidden_size=h, intermediate_size=inter, num_layers=layers, num_heads=heads,
        num_kv_heads=kv, head_dim=head_dim, vocab_size=vocab,
        max_positions=config.get("max_position_embeddings", 32768), rope_theta=rope_theta_of(config),
        rms_norm_eps=config.get("rms_norm_eps", 1e-6), tied_embeddings=tied, qkv_bias=fam.qkv_bias,
        dtype=str(config.get("dtype") or config.get("torch_dtype") or "float32"), params=params,
        quantization=dict(config.get("quantization_config") or {}),
    )
