"""GPTQ: packing recovered by an independent unpacker, compressed-tensors loaded by transformers,
quality against round-to-nearest, padding, and the error paths."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qwen_quant.calib import CalibConfig
from qwen_quant.errors import QuantError
from qwen_quant.formats import gptq as gptq_format
from qwen_quant.quantize import QuantConfig, quantize_model
from qwen_quant.quantize.gptq import Hessian, gptq_quantize
from qwen_quant.quantize.grid import Grid
from qwen_quant.validate import EvalConfig

SMALL = CalibConfig(nsamples=16, seqlen=128)


def independent_unpack(words: np.ndarray, bits: int, n: int) -> list[int]:
    """Decode a column of int32 words the way AutoGPTQ's pack loop lays them out, with Python ints:
    the words form one little-endian bit string in which code k sits at bits [k*bits, (k+1)*bits)."""
    stream = 0
    for i, w in enumerate(words.tolist()):
        stream |= (w & 0xFFFFFFFF) << (32 * i)
    return [(stream >> (k * bits)) & ((1 << bits) - 1) for k in range(n)]


def _layer(out_f=64, in_f=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) * 0.05
    # correlated inputs with uneven channel scales, as real activations are
    X = (torch.randn(512, 32, generator=g) @ torch.randn(32, in_f, generator=g) + 0.1 * torch.randn(512, in_f, generator=g))
    X = X * torch.linspace(0.1, 3, in_f)
    h = Hessian(in_f, "cpu")
    h.add(X)
    return W, X, h.H


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_packing_round_trips_exactly(bits, sym, desc_act):
    W, _, H = _layer()
    r = gptq_quantize(W, H, Grid(bits, 64, sym), desc_act=desc_act)
    t = gptq_format.pack("lin", r)
    out_f, in_f = W.shape
    qweight, qzeros = t["lin.qweight"].numpy(), t["lin.qzeros"].numpy()
    assert qweight.shape == (in_f * bits // 32, out_f) and qzeros.shape == (4, out_f * bits // 32)
    codes = np.array([independent_unpack(qweight[:, o], bits, in_f) for o in range(out_f)])
    zeros = np.array([independent_unpack(qzeros[g], bits, out_f) for g in range(4)]).T + 1  # stored as zero - 1
    assert (codes == r.codes.numpy()).all()
    assert (zeros == r.zeros.numpy()).all()
    assert torch.equal(t["lin.scales"], r.scales.T.half())
    assert (t["lin.g_idx"].numpy() == np.arange(in_f) // 64).all()
    if sym:
        assert (zeros == 2 ** (bits - 1)).all()
    # and our own dense loader agrees with the quantizer's dequantized weights (up to fp16 scales)
    dense = gptq_format.dequantize(t, "lin", bits)
    assert torch.allclose(dense, r.dequant(), rtol=2e-3, atol=1e-6)


def test_gptq_beats_rtn_on_a_single_layer():
    W, X, H = _layer(seed=1)
    from qwen_quant.quantize.grid import rtn_quantize

    g = Grid(4, 64, True)
    err = {name: float(((X @ (W - r.dequant()).T) ** 2).mean())
           for name, r in (("gptq", gptq_quantize(W, H, g)), ("rtn", rtn_quantize(W, g)))}
    assert err["gptq"] < 0.8 * err["rtn"], err


def _cfg(model, out, **kw):
    kw.setdefault("calib", SMALL)
    kw.setdefault("validate", False)
    return QuantConfig(model=str(model), output=str(out), device="cpu", **kw)


def test_checkpoint_layout_and_config(untied_model, tmp_path):
    results: dict = {}
    out, _ = quantize_model(_cfg(untied_model, tmp_path / "q", options={"results": results}))
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc == {**qc, "quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
                  "damp_percent": 0.01, "checkpoint_format": "gptq"}
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    from safetensors.torch import load_file

    sd = load_file(str(out / "model.safetensors"))
    assert sd["model.layers.0.self_attn.q_proj.qweight"].dtype == torch.int32
    assert sd["model.layers.0.self_attn.q_proj.bias"].dtype == torch.float16  # qkv bias kept
    assert "model.layers.0.self_attn.o_proj.bias" not in sd
    assert "lm_head.weight" in sd  # untied
    assert not any(k.endswith("q_proj.weight") for k in sd)
    name = "model.layers.1.mlp.down_proj"
    codes = np.array([independent_unpack(sd[f"{name}.qweight"][:, o].numpy(), 4, 384) for o in range(128)])
    assert (codes == results[name].codes.numpy()).all()
    summary = json.loads((out / "qwen-quant-quantize.json").read_text())
    assert len(summary["layers"]) == 2 and summary["size_after_bytes"] < summary["size_before_bytes"]


def test_compressed_tensors_output_loads_in_transformers(tied_model, tmp_path):
    """The real loader (transformers + compressed-tensors, CPU) agrees with our dequantized weights."""
    from transformers import AutoModelForCausalLM

    results: dict = {}
    out, _ = quantize_model(_cfg(tied_model, tmp_path / "ct", format="compressed-tensors", options={"results": results}))
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(str(tied_model), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, r in results.items():
            ours.get_submodule(name).weight.copy_(r.dequant())
        ids = torch.randint(0, 5000, (2, 48), generator=torch.Generator().manual_seed(0))
        a, b = loaded(ids).logits, ours(ids).logits
    assert (a - b).abs().max() < 1e-4, float((a - b).abs().max())


def _ppl(model_dir, tokens):
    from qwen_quant.backends import open_backend
    from qwen_quant.validate import evaluate

    with open_backend(model_dir, device="cpu") as b:
        return evaluate(b, tokens, EvalConfig(ctx=256))["perplexity"]


def test_quality_gptq_beats_rtn_and_int8_is_lossless(untied_model, tmp_path, capsys):
    from qwen_quant.calib import eval_tokens
    from qwen_quant.models import load_tokenizer

    tokens = np.asarray(eval_tokens(load_tokenizer(untied_model), max_tokens=4096))
    calib = CalibConfig(nsamples=64, seqlen=256)
    ppl = {"fp32": _ppl(untied_model, tokens)}
    for name, kw in {"gptq-int4": {}, "rtn-int4": {"method": "rtn"}, "gptq-int8": {"bits": 8}}.items():
        out, _ = quantize_model(_cfg(untied_model, tmp_path / name, calib=calib, **kw))
        ppl[name] = _ppl(out, tokens)
    with capsys.disabled():
        print("\nheld-out perplexity (qwen2-tiny-untied, 4096 tokens, ctx 256):", json.dumps(ppl))
    assert ppl["gptq-int4"] < ppl["rtn-int4"]
    assert abs(ppl["gptq-int8"] / ppl["fp32"] - 1) < 0.005


def test_pad_intermediate_like_qwen2_72b(model_72b, tmp_path):
    """896 = 7 x 128 is padded to 1024 with zero units; the padded model computes the same function."""
    out, report = quantize_model(_cfg(model_72b, tmp_path / "p", pad=True, bits=8, validate=True,
                                      eval=EvalConfig(ctx=128, max_tokens=1024, greedy_tokens=8, max_prompts=3)))
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 1024
    m = report.results[0].metrics
    assert m["top1_agreement"] > 0.97 and abs(m["ppl_ratio"] - 1) < 0.01


def test_errors(untied_model, tmp_path, run_cli):
    for cfg, needle in [
        (_cfg(untied_model, tmp_path / "a", bits=5), "--bits 5 is not supported"),
        (_cfg(untied_model, tmp_path / "a", group_size=96), "--group-size 96 is not supported"),
        (_cfg(untied_model, tmp_path / "a", calib=CalibConfig(nsamples=100000, seqlen=512)), "not enough calibration tokens"),
        (_cfg(untied_model, tmp_path / "a", format="awq"), "not available for gptq"),
    ]:
        with pytest.raises(QuantError, match=needle):
            quantize_model(cfg)
    (tmp_path / "exists").mkdir()
    code, _, err = run_cli("gptq", untied_model, "-o", tmp_path / "exists", "-q")
    assert code == 2 and "already exists; pass --force" in err and len(err.strip().splitlines()) == 1


def test_group_size_that_does_not_divide_needs_pad(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwen_quant.calib import default_tokenizer_dir
    from qwen_quant.quantize.config import plan_padding

    hf = {"hidden_size": 128, "num_attention_heads": 4, "intermediate_size": 200}
    with pytest.raises(QuantError, match="does not divide the intermediate size 200.*--pad"):
        plan_padding(QuantConfig("m", "o"), hf)
    assert plan_padding(QuantConfig("m", "o", pad=True), hf) == 1024 - 200
    assert plan_padding(QuantConfig("m", "o", pad=True), {**hf, "intermediate_size": 29568, "hidden_size": 8192,
                                                           "num_attention_heads": 64}) == 29696 - 29568
    with pytest.raises(QuantError, match="group size 128 does not divide the hidden size"):
        plan_padding(QuantConfig("m", "o"), {**hf, "hidden_size": 96, "num_attention_heads": 3})
    del Qwen2Config, Qwen2ForCausalLM, default_tokenizer_dir


def test_interrupted_run_leaves_nothing_that_looks_complete(untied_model, tmp_path, monkeypatch):
    import qwen_quant.quantize.run as run

    calls = {"n": 0}
    real = run.gptq_quantize

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 9:  # second layer
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(run, "gptq_quantize", flaky)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(_cfg(untied_model, tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []


def test_one_pass_capture_is_valid_and_differs(untied_model, tmp_path):
    """--no-true-sequential: every Hessian from the float layer in one pass (AutoGPTQ's true_sequential=False)."""
    seq, one = {}, {}
    quantize_model(_cfg(untied_model, tmp_path / "seq", options={"results": seq}))
    out, _ = quantize_model(_cfg(untied_model, tmp_path / "one", true_sequential=False, options={"results": one}))
    assert json.loads((out / "config.json").read_text())["quantization_config"]["true_sequential"] is False
    q = "model.layers.0.self_attn.q_proj"
    assert torch.equal(seq[q].codes, one[q].codes)  # the first group sees the same inputs either way
    d = "model.layers.0.mlp.down_proj"
    assert not torch.equal(seq[d].codes, one[d].codes)
    assert one[d].error < 0.05
