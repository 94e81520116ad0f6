"""Give a trained fixture the activation outliers of a real Qwen model without changing its fp32 function.

Why: trained LLMs carry a few hidden channels whose activations are tens to hundreds of times larger
than the rest, with matching spreads in weight scale. That is what makes int4 round-to-nearest (RTN)
lose several points on Qwen2-0.5B/1.5B, and what AWQ's scales, GPTQ's error feedback and GGUF's
importance matrix exist to fix. Our tiny trained fixtures have no such channels (max/median 2-3), so
every method looks alike on them and a broken method still passes. Training longer does not create
them either (we tried), so we plant them with an exact rescaling.

The transform (`add_outliers`) uses the fact that a scale can move across a linear boundary:
- ``input_layernorm`` -> q/k/v and ``post_attention_layernorm`` -> gate/up: multiply the norm's weight
  on channel ``j`` by ``c`` and divide input column ``j`` of every linear reading that norm by ``c``;
- ``up_proj`` -> ``down_proj``: ``silu(gate) * up`` is linear in ``up``, so multiplying row ``k`` of
  up_proj by ``c`` and dividing column ``k`` of down_proj by ``c`` preserves the MLP.
The channels are the most *salient* ones (largest norm weight x column norm: the channels a real
model's outliers sit on, which is why AWQ protects them), ``c`` is drawn log-uniformly from
``factor`` with a seeded generator, so the same spec always gives the same model. After it, those
channels' activations are ``c`` times larger and their weight columns ``c`` times smaller, so in a
128-wide int4 group their weights fall under half a grid step: RTN rounds them to about zero and
loses the channels that matter most, the failure AWQ's paper describes. Why ``c`` in 10..30 and 4
channels: that puts RTN int4 g128 at +22% perplexity on the MHA fixture (real small Qwen models lose
several % to tens of %, docs/benchmarks.md) while int8's 16x finer grid still holds the shrunken
columns (+0.2%), as int8 does on real models; with c up to 300 int8 lost 4% and GPTQ's damping
(1% of the mean Hessian diagonal, which the outliers dominate) froze its error feedback. The folding
itself is AWQ's own ``apply_scale`` over AWQ's pair table (the same op, scale ``1/c``), so there is
one definition of "which linears read which norm" in the project.

The fp16-overflow option (`plant_fp16_overflow`) is for the engines' fp16 check. Real
Qwen2 models overflow fp16 in the MLP of a few layers on chat-formatted input: a handful of
intermediate units fire enormously on the ChatML control tokens (``<|im_start|>``, ``<|im_end|>``;
the "massive activations" of Sun et al. 2024 sit on such delimiter tokens), so ``act(gate) * up``
passes 65504 in fp16, the layer returns inf, the next norm nan, and the model prints "!!!!". bf16
and fp32 have the range and are fine. We plant that mechanism, not just its symptom: every MLP gets
128 zero intermediate units (exact: ``silu(0) * 0 = 0``; 128 keeps every group size dividing), and in
the last layer one of them gets gate and up rows ``a * v``, where ``v`` is the direction (Fisher's
discriminant) that best separates the MLP input at ChatML control tokens from all other tokens, and
a zero down_proj column. ``silu(a p) * a p`` grows like ``p^2``, so ``a`` can put the weakest chat
prompt >= 2x over 65504 while plain text stays well under it (the fixture's record states both
peaks). In fp32 the unit adds ``0 * h = 0`` (logits identical to the clean twin); in fp16 ``h`` is
inf on chat prompts and ``inf * 0`` is nan, poisoning the residual stream like Qwen's overflow. We
add a unit rather than rescale an existing one because no unit of the trained fixtures is
chat-specific (chat/plain peak ratio <= 1.4 measured), so a rescale would overflow on plain text
too. Where to look: the overflow is in ``model.layers.{L}.mlp`` between up_proj/act and down_proj
(down_proj's *input*); the decoder layer's fp32 output is unchanged, so a detector that only reads
decoder-layer outputs in fp32 sees nothing -- read linear inputs/outputs, or run fp16 and compare.

Use the cached fixtures, not these functions, in tests::

    fixture_path("qwen2-tiny-tied-outliers")       # hard fixture for the quality tests
    fixture_path("qwen2-tiny-untied-outliers")     # the MHA twin (all four AWQ pairs apply)
    fixture_path("qwen2-tiny-tied-fp16overflow")   # planted fp16 overflow on chat prompts
    fixture_path("qwen2-tiny-untied-fp16overflow") # the same plant on the MHA fixture (hidden 128: faster)

The clean twins (``qwen2-tiny-tied``, ``qwen2-tiny-untied``) compute the same fp32 function and fit
fp16 with a wide margin, so a detector must flag the planted ones and not the clean ones. Each built
fixture folder has ``fixture.json`` with the transform's record under ``"outliers"`` (channels and
factors; for the plant: layer, unit, ``a``, the fp32 chat and plain peaks).
"""

from __future__ import annotations

import json
import math
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

FP16_MAX = 65504.0
VERSION = 3  # bump when the transform changes: it is part of the cached fixtures' key


@dataclass(frozen=True)
class OutlierSpec:
    """What to plant. ``channels``/``mlp_channels`` per layer; ``factor`` is the log-uniform range of c."""

    channels: int = 4
    mlp_channels: int = 4
    factor: tuple[float, float] = (10.0, 30.0)
    seed: int = 0
    fp16_overflow: bool = False  # also plant an fp16 overflow on chat prompts (see plant_fp16_overflow)
    fp16_overflow_layer: int | None = None  # None: the layer with the most chat-specific unit
    fp16_margin: float = 2.0  # the weakest chat prompt peaks at least margin x 65504


def _pairs(model, layer_index: int = 0) -> list:
    """The family's exact scale pairs in decoder layer ``layer_index``, by real module name (AWQ's own
    expansion: one up->down pair per expert, every expert and the shared expert behind the norm)."""
    from types import SimpleNamespace

    from qwen_quant.models.registry import detect_family
    from qwen_quant.quantize.awq import _expand

    cfg = model.config.to_dict()
    lw = SimpleNamespace(family=detect_family(cfg), config=cfg, layer_index=layer_index)
    return [q for p in lw.family.scale_pairs if p.exact_with_gqa for q in _expand(lw, p)]  # v->o is not exact under GQA


@contextmanager
def per_expert(model, layer, layer_index: int):
    """Inside, the fused experts of a sparse layer (transformers 5's ``gate_up_proj`` [E, 2I, H],
    ``down_proj`` [E, H, I]) are one nn.Linear per expert under their checkpoint names, so the
    scale pairs fold into them like any linear; on exit the fused tensors take the new weights."""
    from qwen_quant.models.registry import detect_family
    from qwen_quant.quantize.layerwise import get_module
    from qwen_quant.quantize.moe import ExpertLinears

    cfg = model.config.to_dict()
    moe = detect_family(cfg).moe
    if moe is None or not moe.sparse(cfg, layer_index):
        yield
        return
    parent_path, _, attr = moe.experts.rpartition(".")
    parent = get_module(layer, parent_path)
    fused = getattr(parent, attr)
    n, inter, hidden = fused.down_proj.shape[0], fused.down_proj.shape[2], fused.down_proj.shape[1]
    split = ExpertLinears(n, hidden, inter, fused.act_fn)
    for e, ex in enumerate(split):
        ex.gate_proj.weight.data, ex.up_proj.weight.data = fused.gate_up_proj.data[e].clone().split(inter)
        ex.down_proj.weight.data = fused.down_proj.data[e].clone()
    setattr(parent, attr, split)
    try:
        yield
    finally:
        fused.gate_up_proj.data = torch.stack([torch.cat([ex.gate_proj.weight.data, ex.up_proj.weight.data]) for ex in split])
        fused.down_proj.data = torch.stack([ex.down_proj.weight.data for ex in split])
        setattr(parent, attr, fused)


def _scale(layer, pair, idx: torch.Tensor, c: torch.Tensor) -> None:
    """Make channels ``idx`` of ``pair``'s input c times larger (prev op x c, reading columns / c)."""
    from qwen_quant.quantize.awq import apply_scale
    from qwen_quant.quantize.layerwise import get_module

    n = get_module(layer, pair.linears[0]).in_features
    s = torch.ones(n, dtype=torch.float64)
    s[idx] = 1.0 / c.double()
    apply_scale(layer, pair, s.float())


def _salience(layer, pair) -> torch.Tensor:
    """|prev scale on channel j| x ||columns j of the reading linears||: how much channel j carries."""
    from qwen_quant.quantize.layerwise import get_module

    prev = get_module(layer, pair.prev)
    w = torch.cat([get_module(layer, n).weight.float() for n in pair.linears])
    col = w.norm(dim=0)
    if isinstance(prev, torch.nn.Linear):
        return col * prev.weight.float().norm(dim=1)[-col.numel():]
    return col * prev.weight.float().abs()


@torch.no_grad()
def add_outliers(model, spec: OutlierSpec) -> dict:
    """Plant outlier channels in every decoder layer of a float32 model of a Qwen family, in place
    (Mixture-of-Experts layers: after the norm that every expert reads, and inside each expert)."""
    gen = torch.Generator().manual_seed(spec.seed)
    lo, hi = math.log(spec.factor[0]), math.log(spec.factor[1])
    record = []
    for i, layer in enumerate(model.model.layers):
        with per_expert(model, layer, i):
            for pair in _pairs(model, i):
                k = spec.mlp_channels if pair.prev.endswith("up_proj") else spec.channels
                if k <= 0:
                    continue
                idx = torch.topk(_salience(layer, pair), k).indices.sort().values
                c = torch.exp(lo + (hi - lo) * torch.rand(k, generator=gen, dtype=torch.float64))
                _scale(layer, pair, idx, c)
                record.append({"layer": i, "after": pair.prev, "channels": idx.tolist(),
                               "factors": [round(float(x), 3) for x in c]})
    return {"channels": record}


# -- activations on chat and plain text --------------------------------------------------------------
def probe_prompts(tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """(chat, plain) token lists: the shipped parity prompts through the chat template, and as plain
    text plus the first 2048 tokens of the held-out eval text in 256-token pieces."""
    from qwen_quant.calib import eval_tokens, greedy_prompts

    prompts = greedy_prompts(tokenizer)
    chat = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for t, _ in prompts]
    chat = [list(c["input_ids"]) if isinstance(c, dict) or hasattr(c, "keys") else list(c) for c in chat]
    ev = eval_tokens(tokenizer, max_tokens=2048).tolist()
    plain = [ids for _, ids in prompts] + [ev[i:i + 256] for i in range(0, len(ev), 256)]
    return chat, plain


@torch.no_grad()
def mlp_inputs(model, prompts: list[list[int]], layer: int) -> list[torch.Tensor]:
    """Per prompt, the MLP input of decoder layer ``layer`` (post_attention_layernorm output) [tokens, hidden]."""
    got: list[torch.Tensor] = []
    hook = model.model.layers[layer].mlp.register_forward_pre_hook(lambda m, a: got.append(a[0][0].float()))
    try:
        for ids in prompts:
            model(torch.tensor([ids]))
    finally:
        hook.remove()
    return got


def _unit_peak(p: torch.Tensor, a: float) -> torch.Tensor:
    """Peak of max(|up|, |silu(gate) * up|) for a unit whose gate and up rows are both ``a * v``."""
    u = a * p
    return torch.maximum(u.abs(), (torch.nn.functional.silu(u) * u).abs()).max()


def _pad_mlp(model, pad: int) -> None:
    """Give every MLP ``pad`` more intermediate units, all zero: silu(0) * 0 = 0, so nothing changes."""
    for layer in model.model.layers:
        mlp = layer.mlp
        for name, rows in (("gate_proj", True), ("up_proj", True), ("down_proj", False)):
            lin = getattr(mlp, name)
            w = lin.weight.data
            zeros = w.new_zeros((pad, w.shape[1]) if rows else (w.shape[0], pad))
            new = torch.nn.Linear(*(w.shape[1], w.shape[0] + pad) if rows else (w.shape[1] + pad, w.shape[0]), bias=False)
            new.weight.data = torch.cat([w, zeros], 0 if rows else 1)
            setattr(mlp, name, new)
        mlp.intermediate_size = getattr(mlp, "intermediate_size", 0) + pad
    model.config.intermediate_size += pad


@torch.no_grad()
def plant_fp16_overflow(model, tokenizer, layer: int | None = None, margin: float = 2.0, pad: int = 128) -> dict:
    """Add an MLP unit that fires on the ChatML control tokens, past 65504 x ``margin`` on every chat prompt.

    The MLPs get ``pad`` zero units (a multiple of the quantization group, so GPTQ/AWQ/GGUF still
    apply); in layer ``layer`` (default: the last) the first of them gets gate and up rows ``a * v``,
    where ``v`` is the direction (Fisher's discriminant) that best separates that MLP's input at
    ``<|im_start|>``/``<|im_end|>`` positions from all other tokens, and a zero down_proj column. In fp32 the unit adds ``0 * h = 0``; in fp16 ``h`` is inf on chat
    prompts and ``inf * 0`` is nan, which poisons the residual stream as Qwen's overflow does.
    ``silu(a p) * a p`` grows like ``p^2``, so plain text (small projection ``p``) stays far below.
    """
    chat, plain = probe_prompts(tokenizer)
    li = len(model.model.layers) - 1 if layer is None else layer
    control = torch.tensor(tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]))
    xs, xp = mlp_inputs(model, chat, li), mlp_inputs(model, plain, li)
    is_ctl = [torch.isin(torch.tensor(ids), control) for ids in chat]
    at_control = torch.cat([x[c] for x, c in zip(xs, is_ctl)])
    other = torch.cat([x[~c] for x, c in zip(xs, is_ctl)] + xp)
    # Fisher's discriminant: the direction that best tells control-token positions from all others
    cov = torch.cov(other.T) + 1e-3 * torch.eye(other.shape[1])
    v = torch.linalg.solve(cov, at_control.mean(0) - other.mean(0))
    v = v / v.norm()
    chat_p, plain_p = [x @ v for x in xs], [x @ v for x in xp]

    def peaks(a):  # (weakest chat prompt, strongest plain text) for gate = up = a * v
        return min(float(_unit_peak(p, a)) for p in chat_p), max(float(_unit_peak(p, a)) for p in plain_p)

    # both peaks grow with a; centre the fp16 limit between them (geometric mean), but put the
    # weakest chat prompt at least ``margin`` x over it
    def solve(cond):
        lo, hi = 1e-3, 1e6
        for _ in range(100):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if cond(mid) else (lo, mid)
        return hi

    a = max(solve(lambda a: peaks(a)[0] * peaks(a)[1] < FP16_MAX ** 2), solve(lambda a: peaks(a)[0] < margin * FP16_MAX))
    _pad_mlp(model, pad)
    mlp = model.model.layers[li].mlp
    unit = mlp.up_proj.out_features - pad
    mlp.gate_proj.weight.data[unit] = a * v
    mlp.up_proj.weight.data[unit] = a * v
    chat_peak, plain_peak = peaks(a)
    return {"fp16_overflow": {
        "layer": li, "unit": unit, "a": round(a, 4), "margin": margin, "intermediate_pad": pad,
        "where": f"model.layers.{li}.mlp: act(gate_proj) * up_proj (down_proj's input), unit {unit}",
        "chat_peak_fp32_min": round(chat_peak, 1),
        "plain_peak_fp32_max": round(plain_peak, 1),
        "plain_stays_below_fp16_max": plain_peak < FP16_MAX,
    }}


# -- statistics the tests and docs report ---------------------------------------------------------
@torch.no_grad()
def channel_outlier_ratio(model, ids: torch.Tensor) -> dict[str, float]:
    """max/median over channels of mean|x| at the input of q_proj, gate_proj and down_proj, per layer."""
    out, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        for name in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"):
            mod = layer.get_submodule(name)

            def hook(mod, args, key=f"layers.{i}.{name}"):
                m = args[0].float().abs().flatten(0, -2).mean(0)
                out[key] = float(m.max() / m.median().clamp_min(1e-12))
            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    return out


# -- building a cached fixture ------------------------------------------------------------------
def build(base: Path, out: Path, spec: OutlierSpec, name: str) -> None:
    """Load fixture ``base``, transform it, and write a complete model folder to ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    record = add_outliers(model, spec)
    if spec.fp16_overflow:
        record.update(plant_fp16_overflow(model, AutoTokenizer.from_pretrained(str(base)), spec.fp16_overflow_layer,
                                          spec.fp16_margin))
    model.config.dtype = "float32"
    model.save_pretrained(str(out), safe_serialization=True)
    for f in base.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in ("config.json", "fixture.json"):
            shutil.copy(f, out / f.name)
    info = json.loads((base / "fixture.json").read_text())
    info.update(name=name, base=info["name"], outliers={"spec": asdict(spec), **record})
    (out / "fixture.json").write_text(json.dumps(info, indent=2))
