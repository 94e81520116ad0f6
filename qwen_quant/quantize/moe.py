"""Mixture-of-Experts layers for quantization: one linear per expert, routed calibration, fused loading.

transformers 5 keeps a sparse layer's experts fused in memory (``experts.gate_up_proj`` [E, 2I, H],
``experts.down_proj`` [E, H, I]) while checkpoints, Qwen's GPTQ releases and every runtime keep them
per expert (``mlp.experts.{e}.gate_proj.weight``). For quantization the layer-by-layer driver swaps
the fused module for `ExpertLinears`, a list of per-expert SwiGLU MLPs whose state-dict names are
the on-disk names, so the driver loads, hooks, quantizes and writes each expert as its own linear
(the approach of llm-compressor's MoE calibration modules).

Calibration (``moe_calibrate``):
- ``routed`` (default): each expert sees only the tokens the router sends to it, so its Hessian is
  built from exactly those tokens (unweighted by the routing weight);
- ``all``: every calibration token passes through every expert (rarely-routed experts get full
  statistics) while the layer's output still sums only the routed experts' results.
An expert whose routed token count is under ``moe_min_tokens`` is quantized with round-to-nearest
instead of GPTQ (listed under ``moe.fallback_rtn`` in ``qwen-quant-quantize.json``).
"""

from __future__ import annotations

import torch
from torch import nn

from qwen_quant.models.family import Family, template_of

DEFAULT_MIN_TOKENS = 32


class _Expert(nn.Module):
    def __init__(self, hidden: int, inter: int, act):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_fn = act

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ExpertLinears(nn.ModuleList):
    """Drop-in for transformers' fused experts module: ``forward(hidden, top_k_index, top_k_weights)``."""

    def __init__(self, num_experts: int, hidden: int, inter: int, act):
        super().__init__([_Expert(hidden, inter, act) for _ in range(num_experts)])
        self.all_tokens = False
        self.routed_tokens = torch.zeros(num_experts, dtype=torch.long, device="cpu")  # summed over every forward

    def forward(self, hidden_states, top_k_index, top_k_weights):
        n, k = top_k_index.shape
        out = torch.zeros_like(hidden_states)
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=len(self)).cpu()  # one host sync per forward
        self.routed_tokens += counts[: len(self)]
        tok, w = order // k, top_k_weights.reshape(-1)[order]
        start = 0
        for e, c in enumerate(counts.tolist()):
            idx, we = tok[start:start + c], w[start:start + c]
            start += c
            if self.all_tokens:
                y = self[e](hidden_states)[idx]
            elif c:
                y = self[e](hidden_states[idx])
            else:
                continue
            out.index_add_(0, idx, (y * we[:, None].to(y.dtype)).to(out.dtype))
        return out


def install(skeleton: nn.Module, family: Family, hf_config) -> None:
    """Replace the fused experts of every sparse layer of a (meta) skeleton with `ExpertLinears`."""
    from qwen_quant.quantize.layerwise import get_module

    moe, cfg = family.moe, hf_config.to_dict()
    if moe is None:
        return
    layers = get_module(skeleton, family.layers_path)
    for i, layer in enumerate(layers):
        if not moe.sparse(cfg, i):
            continue
        parent_path, _, attr = moe.experts.rpartition(".")
        parent = get_module(layer, parent_path)
        fused = getattr(parent, attr)
        with torch.device("meta"):
            new = ExpertLinears(moe.num_experts(cfg), cfg["hidden_size"], cfg[moe.intermediate_key], fused.act_fn)
        setattr(parent, attr, new)


def set_calibrate(skeleton: nn.Module, mode: str) -> None:
    for m in skeleton.modules():
        if isinstance(m, ExpertLinears):
            m.all_tokens = mode == "all"


def routed_counts(layer: nn.Module) -> dict[str, list[int]]:
    """Per-expert routed token counts of the `ExpertLinears` in ``layer``, then reset them."""
    out = {}
    for name, m in layer.named_modules():
        if isinstance(m, ExpertLinears):
            out[name] = m.routed_tokens.tolist()
            m.routed_tokens.zero_()
    return out


def is_expert(family: Family, name: str) -> bool:
    return family.moe is not None and name.startswith(family.moe.experts + ".")


def passes(groups) -> list[tuple]:
    """True-sequential passes: one per group, except that the groups of one template (every expert's
    gate/up, every expert's down) form one pass, captured together and solved as a batch."""
    out: list[list] = []
    prev = None
    for g in groups:
        key = tuple(template_of(n) for n in g)
        if "#" in "".join(key) and key == prev:
            out[-1].append(g)
        else:
            out.append([g])
        prev = key
    return [tuple(p) for p in out]


def split_experts(family: Family, groups) -> tuple[tuple, tuple]:
    """(groups of ordinary linears, groups of routed experts) of one capture pass."""
    plain = tuple(g for g in groups if not is_expert(family, g[0]))
    return plain, tuple(g for g in groups if is_expert(family, g[0]))


def _chunk(cols: int) -> int:
    """Experts per batched solve: about 1 GiB of float32 Hessians at a time."""
    return max(1, (1 << 28) // (cols * cols))


@torch.no_grad()
def quantize_experts(lw, layer: nn.Module, groups, hidden: torch.Tensor, quantizer) -> dict:
    """Capture and solve the experts' groups of one pass (``groups``: one tuple per expert).

    Each expert's Hessian comes from the inputs its hooks see: the tokens routed to it (sorted by
    expert in `ExpertLinears.forward`, one matmul per expert and batch), or every token with
    ``moe_calibrate="all"``. A quantizer with ``solve_batched`` (GPTQ) solves the experts in stacked
    batches; an expert with fewer than ``moe_min_tokens`` tokens is rounded to nearest instead and
    recorded in ``quantizer.moe_fallback``.
    """
    from qwen_quant.quantize.gptq import Hessian
    from qwen_quant.quantize.grid import rtn_quantize
    from qwen_quant.quantize.layerwise import get_module
    from qwen_quant.quantize.run import _relative_error

    firsts = [g[0] for g in groups]
    stats = {n: Hessian(get_module(layer, n).in_features, lw.device) for n in firsts}
    lw.capture(layer, firsts, lambda n, x: stats[n].add(x), hidden)
    batched = getattr(quantizer, "solve_batched", None)
    min_tokens = quantizer.cfg.moe_min_tokens if batched else 0
    out: dict = {}

    def keep(g, lins, parts):
        for n, lin, r in zip(g, lins, parts):
            lin.weight.data = r.dequant().to(lin.weight.dtype)
            out[n] = r

    solvable = []
    for g in groups:
        st = stats[g[0]]
        lins = [get_module(layer, n) for n in g]
        if st.n < min_tokens:  # too few routed tokens for a Hessian: round to nearest
            H = st.S.mul_(2.0 / max(st.n, 1))
            parts = [rtn_quantize(lin.weight.data, quantizer.grid) for lin in lins]
            for lin, r in zip(lins, parts):
                r.error = _relative_error(lin.weight.data, r, H) if st.n else 0.0
            keep(g, lins, parts)
            quantizer.__dict__.setdefault("moe_fallback", []).extend(f"{lw.family.layers_path}.{lw.layer_index}.{n}" for n in g)
            del stats[g[0]]
        else:
            solvable.append(g)
    step = _chunk(get_module(layer, firsts[0]).in_features) if batched else 1
    for c in range(0, len(solvable), step):
        chunk = solvable[c:c + step]
        lins = [[get_module(layer, n) for n in g] for g in chunk]
        Hs = [stats.pop(g[0]) for g in chunk]
        parts = None
        if batched:
            H = torch.stack([st.S.mul_(2.0 / max(st.n, 1)) for st in Hs])
            del Hs
            parts = batched(lins, H)
            if parts is None:
                Hs = list(H.unbind(0))
            del H
        if parts is None:
            parts = [quantizer.solve(ls, st if torch.is_tensor(st) else st.S.mul_(2.0 / max(st.n, 1)))
                     for ls, st in zip(lins, Hs)]
        for g, ls, ps in zip(chunk, lins, parts):
            keep(g, ls, ps)
    return out


def summary(cfg, family: Family, expert_tokens: dict, quantizer) -> dict:
    """The ``moe`` entry of ``qwen-quant-quantize.json``."""
    return {"calibrate": cfg.moe_calibrate, "min_tokens": cfg.moe_min_tokens, "routed_tokens": expert_tokens,
            "fallback_rtn": list(getattr(quantizer, "moe_fallback", [])), "full_precision": list(family.full_precision)}


def fuse_experts(sd: dict[str, torch.Tensor], family: Family, config: dict) -> dict[str, torch.Tensor]:
    """Per-expert ``...experts.{e}.{gate,up,down}_proj.weight`` -> transformers 5's fused tensors."""
    moe = family.moe
    if moe is None:
        return sd
    n = moe.num_experts(config)
    for i in range(config["num_hidden_layers"]):
        p = f"{family.layers_path}.{i}.{moe.experts}"
        if f"{p}.0.gate_proj.weight" not in sd:
            continue
        g = [sd.pop(f"{p}.{e}.gate_proj.weight") for e in range(n)]
        u = [sd.pop(f"{p}.{e}.up_proj.weight") for e in range(n)]
        d = [sd.pop(f"{p}.{e}.down_proj.weight") for e in range(n)]
        sd[f"{p}.gate_up_proj"] = torch.stack([torch.cat([a, b]) for a, b in zip(g, u)])
        sd[f"{p}.down_proj"] = torch.stack(d)
    return sd


def full_precision_patterns(family: Family | None) -> list[str]:
    """compressed-tensors ``ignore`` entries for the family's full-precision modules (router, gates)."""
    return [f"re:.*{name}$" for name in family.full_precision] if family is not None else []
