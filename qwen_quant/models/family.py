"""What a Qwen family is, as data: the table each file under ``models/families/`` fills in.

A family says how to recognise a checkpoint, where its parts live, which linears a quantizer visits
in which order, what stays in full precision, how AWQ may fold scales, which dimensions may be
padded, and how exporters name it (the GGUF architecture and tensor map, the onnxruntime-genai
model type). Every module outside ``qwen_quant/models/`` asks a `Family`; none names an
architecture itself. The shape follows GPTQModel's model definitions: a short declarative table per
architecture, no base-class machinery.

Module names are relative to one decoder layer. ``#`` stands for an expert index in Mixture-of-Experts
layers (``mlp.experts.#.down_proj``); `Family.expand` turns a template into the layer's real names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class ScalePair:
    """One AWQ scaling: the op whose output feeds ``linears`` gets 1/s folded in, the linears s.

    ``inspect``: the block whose output error the search minimises (None: the single linear);
    ``attention``: that block needs position embeddings; ``exact_with_gqa``: the fold is exact when
    K/V heads are shared (False for v -> o, whose outputs are repeated across heads).
    ``also``: full-precision modules that read the same output (a MoE router, the shared-expert
    gate): they get ``s`` folded in too, unquantized, or the fold into ``prev`` would change them.
    """

    prev: str
    linears: tuple[str, ...]
    inspect: str | None = None
    attention: bool = False
    exact_with_gqa: bool = True
    also: tuple[str, ...] = ()


@dataclass(frozen=True)
class Padding:
    """A config dimension that may be padded with zero units without changing the model's function:
    ``rows`` linears gain zero output rows, ``cols`` linears gain zero input columns."""

    key: str
    rows: tuple[str, ...]
    cols: tuple[str, ...]


@dataclass(frozen=True)
class MoE:
    """Where a Mixture-of-Experts layer keeps its experts, as transformers' modeling code names them.

    ``sparse(config, layer)`` says whether decoder layer ``layer`` has experts (some families keep
    dense layers: ``decoder_sparse_step``, ``mlp_only_layers``).
    """

    experts: str = "mlp.experts"
    num_experts_key: str = "num_experts"
    top_k_key: str = "num_experts_per_tok"
    intermediate_key: str = "moe_intermediate_size"
    router: str = "mlp.gate"
    shared_expert: str | None = None
    shared_expert_gate: str | None = None
    shared_intermediate_key: str | None = None
    sparse: Callable[[dict, int], bool] = lambda config, layer: True

    def num_experts(self, config: dict) -> int:
        """Routed experts per sparse layer. Qwen's releases write ``num_experts``; transformers 5 saves
        Qwen3-MoE's count as ``num_local_experts`` (its config's attribute map), so both are read."""
        return int(config.get(self.num_experts_key) or config.get("num_local_experts") or 0)


@dataclass(frozen=True)
class GGUFNames:
    """The llama.cpp side: ``arch`` is the gguf-py ``MODEL_ARCH`` member's name; ``pre`` maps the hash
    of convert_hf_to_gguf.py's check text to the pre-tokenizer name it writes.

    ``params(writer, config)`` makes the family's own ``add_*`` calls, after the keys every text model
    gets (convert_hf_to_gguf.py's subclasses call them after ``TextModel.set_gguf_parameters``, i.e.
    after ``general.file_type``; key order is part of the bytes). In a MoE family the writer stacks the
    per-expert tensors of a layer into one 3-D tensor per projection (``ffn_{gate,up,down}_exps``), as
    the converter's ``Qwen2MoeModel.modify_tensors`` does; ``dense_layers`` says whether llama.cpp's
    architecture can hold layers without experts (llama.cpp's qwen2moe/qwen3moe cannot).

    ``tensors(name, tensor, config)`` is the family's part of the converter's ``modify_tensors``: it
    takes one checkpoint tensor (text-model name, float16/float32) and yields ``(name, tensor)`` pairs,
    each named either in the checkpoint's terms (mapped by gguf-py's tensor map) or already in GGUF's
    (``blk.N....``); None: every tensor passes unchanged. ``skip`` lists checkpoint name prefixes that
    the text GGUF leaves out (a vision tower, the multi-token-prediction head).
    """

    arch: str
    pre: dict[str, str] = field(default_factory=dict)
    params: Callable[[Any, dict], None] | None = None  # family-specific add_* calls on a GGUFWriter
    dense_layers: bool = True
    tensors: Callable[[str, Any, dict], Any] | None = None
    skip: tuple[str, ...] = ()


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    layers_path: str = "model.layers"
    embed_path: str = "model.embed_tokens"
    norm_path: str = "model.norm"
    lm_head_path: str = "lm_head"
    rotary_path: str = "model.rotary_emb"
    # Linears of one decoder layer in quantization order: true-sequential groups, each a tuple of
    # linears that read the same input (one Hessian, one stacked solve).
    linear_groups: tuple[tuple[str, ...], ...] = ()
    # (in_features, out_features) of each linear from config.json: integrity checks and padding plans.
    linear_shapes: Callable[[dict], dict[str, tuple[int, int]]] | None = None
    # Modules that stay in full precision in every quantized format (routers, gates).
    full_precision: tuple[str, ...] = ()
    scale_pairs: tuple[ScalePair, ...] = ()
    padding: tuple[Padding, ...] = ()
    moe: MoE | None = None
    qkv_bias: bool = True
    qk_norm: bool = False
    gguf: GGUFNames | None = None
    onnx_type: str | None = None  # onnxruntime-genai's model type; None: not supported
    onnx_hint: str = ""
    supported: bool = True
    hint: str = ""  # what to do when the family is recognised but not supported directly
    # Hybrid families: (layer type from config ``layer_types``, the token-mixer module of that type).
    # A linear whose first name part is one of these modules exists only in layers of its type.
    mixers: tuple[tuple[str, str], ...] = ()
    full_attention_interval: int = 4  # when config.json has no layer_types (every n-th layer is full attention)
    # RMSNorm computes x * (1 + weight) (zero-centred weight): AWQ folds 1/s as (1 + w) / s - 1.
    norm_offset: float = 0.0
    # Multimodal checkpoints: the text model's config sits under this key of config.json, and its
    # tensors under ``checkpoint_prefix[0]`` on disk where the text model class has ``checkpoint_prefix[1]``.
    text_config_key: str | None = None
    checkpoint_prefix: tuple[str, str] | None = None
    # Where quantization says the GGUF / ONNX exporters cannot go (one line each; "" where they can).
    gguf_hint: str = ""

    def text(self, config: dict) -> dict:
        """The text model's config: config.json itself, or its ``text_config`` with the top-level keys
        a multimodal config keeps for the whole model (tied embeddings, the quantization config) laid over it."""
        if not self.text_config_key or self.text_config_key not in config:
            return config
        inner = dict(config[self.text_config_key])
        for key in ("tie_word_embeddings", "quantization_config"):
            if key in config:
                inner[key] = config[key]
        return inner

    def module_path(self, name: str) -> str:
        """The text model class's name for checkpoint name ``name`` (they differ in multimodal checkpoints)."""
        if self.checkpoint_prefix and name.startswith(self.checkpoint_prefix[0]):
            return self.checkpoint_prefix[1] + name[len(self.checkpoint_prefix[0]):]
        return name

    def layer_type(self, config: dict, layer: int) -> str | None:
        """``linear_attention`` / ``full_attention`` in a hybrid family (None elsewhere), as transformers'
        decoder layer picks it: ``layer_types`` when config.json has it, else every
        ``full_attention_interval``-th layer is full attention."""
        if not self.mixers:
            return None
        types = config.get("layer_types")
        if types:
            return types[layer]
        n = config.get("full_attention_interval") or self.full_attention_interval
        return "full_attention" if (layer + 1) % n == 0 else "linear_attention"

    def layer_mix(self, config: dict) -> dict[str, int]:
        """How many decoder layers of each type (empty for families without layer types)."""
        out: dict[str, int] = {}
        for i in range(config.get("num_hidden_layers", 0)):
            t = self.layer_type(config, i)
            if t is not None:
                out[t] = out.get(t, 0) + 1
        return out

    def layer_groups(self, config: dict, layer: int) -> tuple[tuple[str, ...], ...]:
        """`linear_groups` of decoder layer ``layer``; a group of expert templates (``#``) becomes one
        group per expert, since each expert reads its own routed tokens (groups with no linear in this
        layer, such as the experts of a dense layer, drop out)."""
        out = []
        for g in self.linear_groups:
            if any("#" in n for n in g):
                per = [self.expand(n, config, layer) for n in g]
                out.extend(tuple(names) for names in zip(*per))
                continue
            names = tuple(name for n in g for name in self.expand(n, config, layer))
            if names:
                out.append(names)
        return tuple(out)

    def expand(self, name: str, config: dict, layer: int) -> list[str]:
        """The real module names of template ``name`` in decoder layer ``layer`` ([] where it has none).

        In a MoE family the experts (and the shared expert) exist only in sparse layers, and the other
        ``mlp.*`` linears (a dense MLP) only in the layers that stay dense."""
        if self.mixers:
            mixer = dict(self.mixers)
            head = name.split(".", 1)[0]
            if head in mixer.values() and mixer.get(self.layer_type(config, layer)) != head:
                return []
        moe = self.moe
        if moe is None:
            return [name]
        sparse = moe.sparse(config, layer)
        in_moe = name.startswith((moe.experts + ".",) + ((moe.shared_expert + ".",) if moe.shared_expert else ()))
        if in_moe != sparse and (in_moe or name.startswith("mlp.")):
            return []
        if "#" not in name:
            return [name]
        return [name.replace("#", str(e)) for e in range(moe.num_experts(config))]


def rope_theta_of(config: dict[str, Any]) -> float:
    """rope theta from either the classic field or transformers 5's rope_parameters."""
    rp = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return float(config.get("rope_theta") or rp.get("rope_theta") or 10000.0)


def attention_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of q/k/v/o for the Qwen attention block (explicit ``head_dim`` where the config has one)."""
    h, heads = config["hidden_size"], config["num_attention_heads"]
    hd = config.get("head_dim") or h // heads
    kv = config.get("num_key_value_heads") or heads
    return {"self_attn.q_proj": (h, heads * hd), "self_attn.k_proj": (h, kv * hd), "self_attn.v_proj": (h, kv * hd),
            "self_attn.o_proj": (heads * hd, h)}


def mlp_shapes(config: dict, prefix: str = "mlp", key: str = "intermediate_size") -> dict[str, tuple[int, int]]:
    h, i = config["hidden_size"], config[key]
    return {f"{prefix}.gate_proj": (h, i), f"{prefix}.up_proj": (h, i), f"{prefix}.down_proj": (i, h)}


def template_of(name: str) -> str:
    """The family-table name of a real module name: ``mlp.experts.3.down_proj`` -> ``mlp.experts.#.down_proj``."""
    return ".".join("#" if part.isdigit() else part for part in name.split("."))
