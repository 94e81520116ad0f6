"""AWQ's scale pairs of the hybrid families (qwen3_5, qwen3_next): every fold in the family table leaves
the float decoder layer unchanged, one pair at a time, on transformers' own layers (Gated DeltaNet and
gated full attention, RMSNorm ``x * (1 + w)``); v -> o appears only where K/V heads are not shared."""

from __future__ import annotations

import copy

import pytest
import torch

from hybrid_helpers import TEXT
from qwen_quant.models.families import qwen3_5, qwen3_next
from qwen_quant.quantize import awq
from qwen_quant.quantize.layerwise import get_module


def _model(kind: str, kv_heads: int):
    import transformers as tf

    cfg = {**TEXT, "vocab_size": 64, "num_key_value_heads": kv_heads}
    torch.manual_seed(0)
    if kind == "qwen3_next":
        model = tf.Qwen3NextForCausalLM(tf.Qwen3NextConfig(**cfg, num_experts=0))
    else:
        model = tf.Qwen3_5ForCausalLM(tf.Qwen3_5TextConfig(**cfg))
    with torch.no_grad():  # norms away from their identity init, so a fold that forgets the 1 + w shows
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "A_log", "dt_bias")):
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def _cases():
    for kind, fam in (("qwen3_5_text", qwen3_5.TEXT), ("qwen3_next", qwen3_next.FAMILY)):
        for kv in (2, 4):
            yield pytest.param(kind, fam, kv, id=f"{kind}-kv{kv}")


@pytest.mark.parametrize("kind,fam,kv", list(_cases()))
def test_every_pair_keeps_the_float_layer(kind, fam, kv):
    model = _model(kind, kv)
    config = model.config.to_dict()
    x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(12)[None]
    pos_emb = model.model.rotary_emb(x, pos)
    seen = set()
    for i, layer in enumerate(model.model.layers):
        class FakeLw:  # what _pairs reads from the layerwise driver
            family, layer_index = fam, i
        FakeLw.config = config
        pairs = awq._pairs(FakeLw, layer)
        with torch.no_grad():
            ref = layer(x, position_embeddings=pos_emb, attention_mask=None)
        for p in pairs:
            scaled = copy.deepcopy(layer)
            n_in = get_module(scaled, p.linears[0]).in_features
            awq.apply_scale(scaled, p, torch.rand(n_in, generator=torch.Generator().manual_seed(2)) * 4 + 0.1,
                            fam.norm_offset)
            assert not torch.equal(get_module(scaled, p.linears[0]).weight, get_module(layer, p.linears[0]).weight)
            with torch.no_grad():
                out = scaled(x, position_embeddings=pos_emb, attention_mask=None)
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, msg=f"{kind} layer {i}: {p.prev} -> {p.linears}")
            seen.add((fam.layer_type(config, i), p.prev, p.linears))
            if p.prev == "input_layernorm" and i == 0:  # the same fold without the 1 + w offset changes the layer
                plain = copy.deepcopy(layer)
                awq.apply_scale(plain, p, torch.rand(n_in, generator=torch.Generator().manual_seed(2)) * 4 + 0.1)
                with torch.no_grad():
                    assert (plain(x, position_embeddings=pos_emb, attention_mask=None) - ref).abs().max() > 1e-2
    kinds = {(t, prev) for t, prev, _ in seen}
    assert ("linear_attention", "input_layernorm") in kinds and ("full_attention", "input_layernorm") in kinds
    assert ("linear_attention", "post_attention_layernorm") in kinds and ("linear_attention", "mlp.up_proj") in kinds
    assert (("full_attention", "self_attn.v_proj") in kinds) == (kv == 4)  # GQA: v's rows are repeated over heads
    assert not any(prev.startswith("linear_attn.") for _, prev in kinds)  # the gated norm -> out_proj is not a fold
