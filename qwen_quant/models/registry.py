"""The registry of Qwen families (one file each under `families/`), asked by every other module.

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
from qwen_quant.models.families import FAMILIES, qwen2, qwen_v1
from qwen_quant.models.family import Family, rope_theta_of, template_of

QwenFamily = Family  # the name other modules have used
QWEN2 = qwen2.FAMILY
QWEN_V1 = qwen_v1.FAMILY


def family_named(name: str) -> Family:
    for fam in FAMILIES:
        if fam.name == name:
            return fam
    raise QuantError(f"unknown family {name!r}; qwen-quant knows {', '.join(f.name for f in FAMILIES)}")


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
    qk_norm: bool
    dtype: str
    params: int = 0
    quantization: dict[str, Any] = field(default_factory=dict)
    experts: dict[str, Any] = field(default_factory=dict)  # Mixture-of-Experts layout; empty when dense
    layer_mix: dict[str, int] = field(default_factory=dict)  # hybrid families: layers per token-mixer type
    full_precision: tuple[str, ...] = ()  # linears every quantized format keeps in full precision

    @property
    def gqa(self) -> bool:
        return self.num_kv_heads != self.num_heads

    def quirks(self) -> list[str]:
        q = ["tied embeddings" if self.tied_embeddings else "untied lm_head"]
        if self.qkv_bias:
            q.append("qkv bias")
        if self.qk_norm:
            q.append("qk-norm")
        if self.head_dim * self.num_heads != self.hidden_size:
            q.append(f"head_dim {self.head_dim} (not hidden/heads)")
        q.append(f"GQA {self.num_heads}:{self.num_kv_heads}" if self.gqa else "MHA")
        if self.intermediate_size % 1024:
            q.append(f"intermediate {self.intermediate_size} not a multiple of 1024")
        if e := self.experts:
            q.append(f"MoE: {e['routed']} experts of {e['intermediate']}, top-{e['top_k']}"
                     + (f", shared expert of {e['shared_expert']} behind a sigmoid gate" if e["shared_expert"] else "")
                     + (f", dense layers {e['dense_layers']}" if e["dense_layers"] else ""))
        if self.layer_mix:
            q.append("layers: " + " + ".join(f"{n} {t.replace('_', ' ')}" for t, n in self.layer_mix.items()))
        return q


def model_info(config: dict[str, Any], model_dir: Path | str | None = None) -> ModelInfo:
    fam = detect_family(config, model_dir)
    quant = dict(config.get("quantization_config") or {})
    config = fam.text(config)  # a multimodal checkpoint: its text model's sizes
    h, heads = config["hidden_size"], config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    inter = config.get("intermediate_size") or config.get("moe_intermediate_size") or 0
    layers, vocab = config["num_hidden_layers"], config["vocab_size"]
    tied = bool(config.get("tie_word_embeddings", False))
    params = _params(fam, config) + vocab * h * (1 if tied else 2) + h
    return ModelInfo(
        family=fam.name, hidden_size=h, intermediate_size=inter, num_layers=layers, num_heads=heads,
        num_kv_heads=kv, head_dim=head_dim, vocab_size=vocab,
        max_positions=config.get("max_position_embeddings", 32768), rope_theta=rope_theta_of(config),
        rms_norm_eps=config.get("rms_norm_eps", 1e-6), tied_embeddings=tied, qkv_bias=fam.qkv_bias, qk_norm=fam.qk_norm,
        dtype=str(config.get("dtype") or config.get("torch_dtype") or "float32"), params=params,
        quantization=quant, experts=_experts(fam, config), layer_mix=fam.layer_mix(config), full_precision=fam.full_precision,
    )


def _experts(fam: Family, config: dict[str, Any]) -> dict[str, Any]:
    moe = fam.moe
    if moe is None:
        return {}
    layers = range(config["num_hidden_layers"])
    return {"routed": moe.num_experts(config), "top_k": config.get(moe.top_k_key), "intermediate": config.get(moe.intermediate_key),
            "shared_expert": config.get(moe.shared_intermediate_key) if moe.shared_intermediate_key else None,
            "sparse_layers": sum(moe.sparse(config, i) for i in layers),
            "dense_layers": [i for i in layers if not moe.sparse(config, i)],
            "full_precision": list(fam.full_precision)}


def _params(fam: Family, config: dict[str, Any]) -> int:
    """Weights of every decoder layer from the family's linear shapes (+ biases and norms)."""
    if fam.linear_shapes is None:
        return 0
    shapes = fam.linear_shapes(config)
    total = 0
    for layer in range(config["num_hidden_layers"]):
        for group in fam.layer_groups(config, layer):
            for name in group:
                i, o = shapes[template_of(name)]
                total += i * o
        total += 2 * config["hidden_size"]
    if fam.qkv_bias:
        total += sum(shapes[n][1] for n in fam.linear_groups[0]) * config["num_hidden_layers"]
    return total

