"""GGUF writer (qwen_quant/export/gguf.py) and llama.cpp quantizer (gguf_quant.py) on the trained fixtures."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from gguf_helpers import f16_gguf, gguf_logits, mean_kl, model_dir, torch_logits  # noqa: E402

from qwen_quant.errors import QuantError  # noqa: E402
from qwen_quant.export.gguf_quant import QUANT_TYPES, parse_types, quantize_gguf  # noqa: E402


def _metadata(path) -> dict[str, str]:
    """Scalar GGUF metadata as llama.cpp reads it (vocab-only load: fast, no GGUFReader parse)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return dict(llm.metadata)
    finally:
        llm.close()


@pytest.mark.parametrize("name", ["qwen2-tiny-tied", "qwen2-tiny-untied"])
def test_f16_matches_torch_fp32(name):
    ref, got = torch_logits(name), gguf_logits(f16_gguf(name))
    """Top-1 agrees wherever the reference's top-2 margin exceeds the logit tolerance (1e-2).

    A position whose two best logits are closer than that is a tie: f16 weights and llama.cpp's
    f16 KV cache may pick either (the tied fixture has one, margin 1.6e-4, in 192 positions).
    """
    same = ref.argmax(-1) == got.argmax(-1)
    top2 = np.sort(ref, axis=-1)[..., -2:]
    decided = (top2[..., 1] - top2[..., 0]) > 1e-2
    diff = float(np.abs(ref - got).max())
    print(f"{name} f16: top1 {same.mean():.4f} (decided positions {same[decided].mean():.4f}, "
          f"{(~decided).sum()} ties) max|dlogit| {diff:.2e} KL {mean_kl(ref, got):.2e}")
    assert same[decided].all()
    assert decided.mean() > 0.9
    assert diff < 1e-2


@pytest.mark.parametrize("name", ["qwen2-tiny-tied", "qwen2-tiny-untied"])
def test_metadata_matches_config(name):
    cfg = json.loads((model_dir(name) / "config.json").read_text())
    md = _metadata(f16_gguf(name))
    assert md["general.architecture"] == "qwen2"
    assert md["general.file_type"] == "1"
    assert int(md["qwen2.block_count"]) == cfg["num_hidden_layers"]
    assert int(md["qwen2.context_length"]) == cfg["max_position_embeddings"]
    assert int(md["qwen2.embedding_length"]) == cfg["hidden_size"]
    assert int(md["qwen2.feed_forward_length"]) == cfg["intermediate_size"]
    assert int(md["qwen2.attention.head_count"]) == cfg["num_attention_heads"]
    assert int(md["qwen2.attention.head_count_kv"]) == cfg["num_key_value_heads"]
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta"))
    assert float(md["qwen2.rope.freq_base"]) == pytest.approx(theta)
    assert float(md["qwen2.attention.layer_norm_rms_epsilon"]) == pytest.approx(cfg["rms_norm_eps"])
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "qwen2"
    assert md["tokenizer.ggml.eos_token_id"] == "151643"
    assert "<|im_start|>" in md["tokenizer.chat_template"]


@pytest.mark.parametrize("name", ["qwen2-tiny-tied", "qwen2-tiny-untied"])
def test_transformers_reads_back_same_tensors(name):
    """transformers' GGUF loader (qwen2 supported) gives back the checkpoint's weights, f16-rounded.

    ``from_pretrained(gguf_file=...)`` needs accelerate; without it we call the same loader
    (``load_gguf_checkpoint``) directly, once, because each GGUFReader parse of the 152k vocab is slow.
    """
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM

    path = f16_gguf(name)
    orig = AutoModelForCausalLM.from_pretrained(model_dir(name), dtype=torch.float32)
    if importlib.util.find_spec("accelerate"):
        back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        assert back.config.tie_word_embeddings == orig.config.tie_word_embeddings
        got = back.state_dict()
    else:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=orig)
        cfg = parsed["config"]
        assert cfg["model_type"] == "qwen2"
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "intermediate_size", "max_position_embeddings", "vocab_size"):
            assert cfg[key] == getattr(orig.config, key), key
        got = {k: torch.as_tensor(v) for k, v in parsed["tensors"].items()}
        # tied: the GGUF has no output.weight, so no lm_head comes back; untied: it does
        assert ("lm_head.weight" in got) != orig.config.tie_word_embeddings
        if orig.config.tie_word_embeddings:
            got["lm_head.weight"] = got["model.embed_tokens.weight"]
    want = orig.state_dict()
    assert set(got) == set(want)
    for k, w in want.items():
        rounded = w if w.ndim == 1 else w.half().float()  # 1-D (norms, biases) stay F32
        assert torch.equal(got[k].float(), rounded), k


def test_quant_types_kl(tmp_path):
    """q8_0 is near-lossless; the others are reported (llama.cpp falls back per tensor on 128-wide rows)."""
    name = "qwen2-tiny-tied"
    ref = torch_logits(name)
    kls = {}
    for t in ("q8_0", "q4_k_m"):
        out = quantize_gguf(f16_gguf(name), tmp_path / f"m-{t}.gguf", t)
        kls[t] = mean_kl(ref, gguf_logits(out))
        assert _metadata(out)["general.file_type"] == str(int(QUANT_TYPES[t]))
    print(f"{name} mean KL vs torch fp32: " + ", ".join(f"{t} {v:.2e}" for t, v in kls.items()))
    assert kls["q8_0"] < 1e-3
    assert kls["q4_k_m"] > kls["q8_0"]


@pytest.mark.parametrize("qtype", ["q6_k", "q5_k_m", "q5_0", "q4_0", "q3_k_m", "q2_k"])
def test_every_type_loads_and_runs(tmp_path, qtype):
    name = "qwen2-tiny-untied"  # hidden 128: every k-quant tensor takes llama.cpp's per-tensor fallback
    out = quantize_gguf(f16_gguf(name), tmp_path / f"m-{qtype}.gguf", qtype)
    got = gguf_logits(out, rows=1, seq=32)
    assert np.isfinite(got).all()
    assert not list(tmp_path.glob(".*tmp*"))


def test_parse_types():
    assert parse_types("Q4_K_M, q8_0,q4_k_m") == ["q4_k_m", "q8_0"]
    with pytest.raises(QuantError, match="q5_k_m"):  # the message lists the supported names
        parse_types("q4_k_x")


def test_failed_quantize_leaves_no_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(QuantError, match="failed to quantize"):
        quantize_gguf(bad, tmp_path / "out.gguf", "q4_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.gguf"]


@pytest.mark.parametrize("outtype", ["bf16", "f32"])
def test_other_float_outtypes(tmp_path, outtype):
    from qwen_quant.export.gguf import write_float_gguf

    name = "qwen2-tiny-untied"
    out = write_float_gguf(model_dir(name), tmp_path / f"m-{outtype}.gguf", outtype)
    assert _metadata(out)["general.file_type"] == {"bf16": "32", "f32": "0"}[outtype]
    ref, got = torch_logits(name, 1, 32), gguf_logits(out, rows=1, seq=32)
    print(f"{name} {outtype}: max|dlogit| {np.abs(ref - got).max():.2e} KL {mean_kl(ref, got):.2e}")
    assert mean_kl(ref, got) < (1e-3 if outtype == "bf16" else 1e-6)
