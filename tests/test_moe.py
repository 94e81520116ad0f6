"""Mixture-of-Experts quantization (qwen_quant/quantize/moe.py, gptq_batched.py): fast checks."""

from __future__ import annotations

import pytest
import torch

from qwen_quant.quantize.gptq import gptq_quantize
from qwen_quant.quantize.gptq_batched import gptq_quantize_batched
from qwen_quant.quantize.grid import Grid


@pytest.mark.parametrize("grid", [Grid(4, 128, True), Grid(4, 64, False), Grid(4, -1, True)])
def test_batched_solve_equals_per_expert_solve(grid):
    """The batched experts' solve gives the per-expert loop's codes (measured: identical, 100%)."""
    torch.manual_seed(0)
    E, R, C = 4, 64, 256
    W = torch.randn(E, R, C)
    X = torch.randn(E, 300, C)
    H = torch.einsum("etk,etl->ekl", X, X) * 2 / 300
    batched = gptq_quantize_batched(W, H.clone(), grid)
    loop = [gptq_quantize(W[e], H[e].clone(), grid) for e in range(E)]
    for a, b in zip(batched, loop):
        assert torch.equal(a.codes, b.codes)
        assert torch.allclose(a.scales, b.scales)
        assert abs(a.error - b.error) < 1e-6


# -- AWQ's shared scale on a MoE block ------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """family name -> a tiny random checkpoint of it (built once per module)."""
    from moe_helpers import family_named, save_tiny

    made = {}

    def get(name: str):
        if name not in made:
            made[name] = save_tiny(family_named(name), tmp_path_factory.mktemp(name) / name)
        return made[name]

    return get


def _moe_layer(src, name: str):
    """Sparse decoder layer 1 of checkpoint ``src``, loaded by the quantization driver (per-expert
    linears), a few token rows into it, its float update to them (output - input), and the driver."""
    import json

    from moe_helpers import family_named

    from qwen_quant.quantize.layerwise import Layerwise

    fam = family_named(name)
    lw = Layerwise(str(src), json.loads((src / "config.json").read_text()), fam, device="cpu", dtype=torch.float32)
    hidden = lw.embed(torch.randint(0, 5000, (2, 24), generator=torch.Generator().manual_seed(0)))
    layer = lw.load(f"{fam.layers_path}.1")
    return lw, layer, hidden, lw.forward(layer, hidden) - hidden


def _moe_pair(lw, layer):
    from qwen_quant.quantize import awq

    return next(p for p in awq._pairs(lw, layer) if p.prev == "post_attention_layernorm")


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", ["qwen2_moe", "qwen3_moe"])
def test_awq_shared_scale_fold_keeps_the_moe_layer(tiny_moe, name):
    """All experts (+ the shared expert) read the same normed input: one per-channel scale folded into
    post_attention_layernorm and into every expert, the shared expert, the router and the shared-expert
    gate leaves the layer's float output unchanged (measured: ~1e-7 relative)."""
    from qwen_quant.quantize import awq

    lw, layer, hidden, ref = _moe_layer(tiny_moe(name), name)
    pair = _moe_pair(lw, layer)
    experts = [f"mlp.experts.{e}.{p}" for e in range(4) for p in ("gate_proj", "up_proj")]
    shared = ["mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"] if name == "qwen2_moe" else []
    assert sorted(pair.linears) == sorted(experts + shared)
    assert pair.also == (("mlp.gate", "mlp.shared_expert_gate") if name == "qwen2_moe" else ("mlp.gate",))
    s = torch.rand(64, generator=torch.Generator().manual_seed(1)) * 4 + 0.1
    awq.apply_scale(layer, pair, s)
    assert _rel(lw.forward(layer, hidden) - hidden, ref) < 1e-5


@pytest.mark.parametrize("name", ["qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize("broken", ["one expert", "router left out"])
def test_awq_fold_breaks_when_not_shared(tiny_moe, name, broken):
    """The disabled twins: the same scale folded into the norm but only into expert 0, or into every
    linear but not the router (the routing then changes), moves the layer's output."""
    from dataclasses import replace

    from qwen_quant.quantize import awq

    lw, layer, hidden, ref = _moe_layer(tiny_moe(name), name)
    pair = _moe_pair(lw, layer)
    pair = replace(pair, linears=("mlp.experts.0.gate_proj", "mlp.experts.0.up_proj")) if broken == "one expert" \
        else replace(pair, also=pair.also[1:])
    s = torch.rand(64, generator=torch.Generator().manual_seed(1)) * 4 + 0.1
    awq.apply_scale(layer, pair, s)
    assert _rel(lw.forward(layer, hidden) - hidden, ref) > 1e-3


@pytest.mark.parametrize("name", ["qwen2_moe", "qwen3_moe"])
def test_outlier_transform_keeps_a_moe_model(tiny_moe, name):
    """The hard MoE fixtures' transform (outlier channels after the norm all experts read, and inside
    each expert, folded through the fused expert tensors) leaves the float logits unchanged."""
    from transformers import AutoModelForCausalLM

    from qwen_quant.faults.outliers import OutlierSpec, add_outliers

    model = AutoModelForCausalLM.from_pretrained(tiny_moe(name), dtype=torch.float32).eval()
    ids = torch.randint(0, 5000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        record = add_outliers(model, OutlierSpec())
        out = model(ids).logits
    after = {r["after"] for r in record["channels"] if r["layer"] == 1}
    assert {"post_attention_layernorm", "mlp.experts.3.up_proj"} <= after
    assert ("mlp.shared_expert.up_proj" in after) == (name == "qwen2_moe")
    w = model.model.layers[1].post_attention_layernorm.weight
    assert float(w.abs().max() / w.abs().median()) > 5  # the planted channels
    assert _rel(out, ref) < 1e-4
