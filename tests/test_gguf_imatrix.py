"""Importance matrix (qwen_quant/export/gguf_imatrix.py) and its path into llama.cpp's quantizer."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from gguf_helpers import TOKENIZER_DIR, f16_gguf, gguf_logits, mean_kl, model_dir, torch_logits  # noqa: E402

from qwen_quant.export.gguf_imatrix import compute_imatrix  # noqa: E402
from qwen_quant.export.gguf_quant import quantize_gguf  # noqa: E402

NAME = "qwen2-tiny-tied"  # hidden 256: q4_k_m really uses Q4_K/Q6_K on the attention and gate/up rows


@pytest.fixture(scope="module")
def stats():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwen_quant.calib import CalibConfig

    samples = CalibConfig(nsamples=8, seqlen=128).samples(AutoTokenizer.from_pretrained(TOKENIZER_DIR))
    model = AutoModelForCausalLM.from_pretrained(model_dir(NAME), dtype=torch.float32).eval()
    return compute_imatrix(model, samples)


def test_imatrix_names_shapes_counts(stats):
    cfg = json.loads((model_dir(NAME) / "config.json").read_text())
    h, ff = cfg["hidden_size"], cfg["intermediate_size"]
    expect = {f"blk.{i}.{n}.weight": (ff if n == "ffn_down" else h)
              for i in range(cfg["num_hidden_layers"])
              for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    values = stats.values()
    assert {k: v.shape[0] for k, v in values.items()} == expect
    assert set(stats.counts.values()) == {8 * 128}
    assert all(np.isfinite(v).all() and (v >= 0).all() and v.max() > 0 for v in values.values())
    # q, k and v read the same normed input, so they get the same importance
    np.testing.assert_allclose(values["blk.0.attn_q.weight"], values["blk.0.attn_v.weight"], rtol=1e-6)


def test_imatrix_reaches_quantizer(stats, tmp_path):
    src = f16_gguf(NAME)
    plain = quantize_gguf(src, tmp_path / "plain.gguf", "q4_k_m")
    weighted = quantize_gguf(src, tmp_path / "imat.gguf", "q4_k_m", imatrix=stats.values())
    assert plain.read_bytes() != weighted.read_bytes()
    ref = torch_logits(NAME)
    kl_plain, kl_imat = mean_kl(ref, gguf_logits(plain)), mean_kl(ref, gguf_logits(weighted))
    print(f"{NAME} q4_k_m mean KL vs torch fp32: plain {kl_plain:.3e}, imatrix {kl_imat:.3e}")
    assert kl_imat < 2 * kl_plain  # never much worse; on real text it is usually better


def test_imatrix_rejects_non_finite(tmp_path):
    from qwen_quant.errors import QuantError

    with pytest.raises(QuantError, match="non-finite"):
        quantize_gguf(f16_gguf(NAME), tmp_path / "x.gguf", "q4_k_m", imatrix={"blk.0.attn_q.weight": np.array([np.nan])})
