"""int4 (MatMulNBits) and int8 (dynamic) ONNX exports (qwen_quant/export/onnx_quant.py).

Quality numbers are printed (run with -s): top-1 agreement and mean KL(torch fp32 || onnx) over
256 tokens of the shipped evaluation text.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _export(model, out, **kw):
    from qwen_quant.export.onnx import OnnxExportConfig, export_onnx

    return export_onnx(OnnxExportConfig(model=str(model), output=str(out), validate=False, **kw))


def _quality(onnx_dir, model_dir, label):
    from transformers import AutoTokenizer

    from qwen_quant.backends.onnxrt import OrtBackend
    from qwen_quant.backends.torch_backend import TorchBackend
    from qwen_quant.calib import eval_tokens

    toks = np.asarray(eval_tokens(AutoTokenizer.from_pretrained(str(model_dir)), "shipped", max_tokens=257))
    ids = toks[:256].astype(np.int64).reshape(2, 128)
    ob = OrtBackend(onnx_dir, device="cpu")
    a = ob.logits(ids).astype(np.float64)
    b = TorchBackend(model_dir, device="cpu", dtype="float32").logits(ids).astype(np.float64)
    la = a - a.max(-1, keepdims=True)
    la -= np.log(np.exp(la).sum(-1, keepdims=True))
    lb = b - b.max(-1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(-1, keepdims=True))
    kl = float((np.exp(lb) * (lb - la)).sum(-1).mean())
    top1 = float((a.argmax(-1) == b.argmax(-1)).mean())
    size = sum(f.stat().st_size for f in onnx_dir.glob("model.onnx*")) / 1e6
    print(f"{label} ({ob.dtype}): top-1 {top1:.3f}, KL {kl:.4f}, {size:.1f} MB")
    return ob, top1, kl


def test_int4_sym_tied(tied_model, tmp_path):
    import onnx

    from qwen_quant.export.onnx_quant import ort_has_gather_block_quantized, summary

    out = _export(tied_model, tmp_path / "q4", int4=True, block_size=32, symmetric=True)
    ops = summary(onnx.load(str(out / "model.onnx")))
    # 7 linears per layer + the (tied) LM head; only the two attention MatMuls per layer stay float.
    assert ops["MatMulNBits"] == 2 * 7 + 1 and ops.get("MatMul", 0) == 2 * 2
    if ort_has_gather_block_quantized():
        assert ops.get("GatherBlockQuantized") == 1 and "Gather" not in ops
    ob, top1, kl = _quality(out, tied_model, "int4 sym b32 tied")
    assert top1 >= 0.85 and kl < 0.05
    og = pytest.importorskip("onnxruntime_genai")
    prompt = [151644, 872, 198, 3838, 374, 279, 6722, 315, 9625, 30, 151645, 198, 151644, 77091, 198]
    params = og.GeneratorParams(og_model := og.Model(str(out)))
    params.set_search_options(do_sample=False, max_length=len(prompt) + 16, min_length=len(prompt) + 16)
    gen = og.Generator(og_model, params)
    gen.append_tokens(prompt)
    toks = []
    while not gen.is_done():
        gen.generate_next_token()
        toks.append(int(gen.get_next_tokens()[0]))
    assert toks == ob.greedy(prompt, 16)


def test_int4_asym_untied_block64(untied_model, tmp_path):
    import onnx

    from qwen_quant.export.onnx_quant import summary

    out = _export(untied_model, tmp_path / "q4a", int4=True, block_size=64, symmetric=False, int4_embeddings=False)
    ops = summary(onnx.load(str(out / "model.onnx")))
    assert ops["MatMulNBits"] == 2 * 7 + 1 and ops.get("Gather") == 1 and "GatherBlockQuantized" not in ops
    _, top1, kl = _quality(out, untied_model, "int4 asym b64 untied")
    assert top1 >= 0.8 and kl < 0.1


@pytest.mark.slow
def test_int8_dynamic_quality(tied_model, tmp_path):
    """Slow (~50 s on 2 busy cores): ORT's per-channel int8 quantizer loops in Python over the 152k LM-head rows."""
    out = _export(tied_model, tmp_path / "q8", int8=True)
    _, top1, kl = _quality(out, tied_model, "int8 dynamic tied")
    assert top1 >= 0.9 and kl < 0.02


def test_int8_dynamic_small_vocab(tmp_path):
    """The int8 path on a random Qwen2 with a 2k vocabulary (fast); quality is checked in the slow test."""
    import onnx
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwen_quant.backends.onnxrt import OrtBackend
    from qwen_quant.backends.torch_backend import TorchBackend
    from qwen_quant.export.onnx_quant import summary

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=2048, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.1)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "rand")
    q8 = _export(tmp_path / "rand", tmp_path / "q8", int8=True)
    ops = summary(onnx.load(str(q8 / "model.onnx")))
    assert ops.get("DynamicQuantizeMatMul", 0) + ops.get("MatMulInteger", 0) >= 2 * 7 + 1 and "MatMul" in ops
    ids = np.random.default_rng(0).integers(0, 2048, (2, 32))
    a = OrtBackend(q8, device="cpu").logits(ids)
    b = TorchBackend(tmp_path / "rand", device="cpu", dtype="float32").logits(ids)
    assert float((a.argmax(-1) == b.argmax(-1)).mean()) >= 0.9


def test_bad_options(tied_model, tmp_path):
    from qwen_quant.errors import QuantError

    with pytest.raises(QuantError, match="block-size"):
        _export(tied_model, tmp_path / "x", int4=True, block_size=48)
    with pytest.raises(QuantError, match="exclude"):
        _export(tied_model, tmp_path / "x", int4=True, int8=True)
    assert not (tmp_path / "x").exists()
