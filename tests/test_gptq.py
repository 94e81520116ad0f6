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
from qwen_quant.quantize import GPTQConfig, config_for, quantize_model
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
    return config_for(kw.pop("method", "gptq"), model=str(model), output=str(out), device="cpu", **kw)


def _keep(store: dict):
    """An ``on_layer`` callback keeping every linear's QuantResult under its full module path."""
    return lambda path, results: store.update({f"{path}.{k}": v for k, v in results.items()})


def test_checkpoint_layout_and_config(untied_model, tmp_path):
    results: dict = {}
    out, _ = quantize_model(_cfg(untied_model, tmp_path / "q"), on_layer=_keep(results))
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
    out, _ = quantize_model(_cfg(tied_model, tmp_path / "ct", format="compressed-tensors"), on_layer=_keep(results))
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

    from qwen_quant.models import QWEN2

    hf = {"hidden_size": 128, "num_attention_heads": 4, "intermediate_size": 200}
    with pytest.raises(QuantError, match="does not divide the intermediate size 200.*--pad"):
        plan_padding(GPTQConfig("m", "o"), hf, QWEN2)
    assert plan_padding(GPTQConfig("m", "o", pad=True), hf, QWEN2) == 1024 - 200
    assert plan_padding(GPTQConfig("m", "o", pad=True), {**hf, "intermediate_size": 29568, "hidden_size": 8192,
                                                           "num_attention_heads": 64}, QWEN2) == 29696 - 29568
    with pytest.raises(QuantError, match="group size 128 does not divide the in-features 96 of self_attn.q_proj"):
        plan_padding(GPTQConfig("m", "o"), {**hf, "hidden_size": 96, "num_attention_heads": 3}, QWEN2)
    del Qwen2Config, Qwen2ForCausalLM, default_tokenizer_dir


def test_interrupted_run_leaves_nothing_that_looks_complete(untied_model, tmp_path, monkeypatch):
    import qwen_quant.quantize.run as run

    calls = {"n": 0}
    real = run.gptq_quantize

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:  # second layer (4 solves per layer: q/k/v, o, gate/up, down)
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(run, "gptq_quantize", flaky)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(_cfg(untied_model, tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []


def test_one_pass_capture_is_valid_and_differs(untied_model, tmp_path):
    """--no-true-sequential: every Hessian from the float layer in one pass (AutoGPTQ's true_sequential=False)."""
    seq, one = {}, {}
    quantize_model(_cfg(untied_model, tmp_path / "seq"), on_layer=_keep(seq))
    out, _ = quantize_model(_cfg(untied_model, tmp_path / "one", true_sequential=False), on_layer=_keep(one))
    assert json.loads((out / "config.json").read_text())["quantization_config"]["true_sequential"] is False
    q = "model.layers.0.self_attn.q_proj"
    assert torch.equal(seq[q].codes, one[q].codes)  # the first group sees the same inputs either way
    d = "model.layers.0.mlp.down_proj"
    assert not torch.equal(seq[d].codes, one[d].codes)
    assert one[d].error < 0.05


# -- the GPU-oriented solve computes what the reference loop computed ------------------------------
def _reference_gptq(weight, H, grid, damp=0.01, desc_act=False, blocksize=128):
    """The column loop as it stood before it was made sync-free (IST-DASLab ``fasterquant`` order):
    kept here as the oracle for codes, scales and zeros."""
    from qwen_quant.quantize.grid import find_params, quantize_codes

    W = weight.detach().float().clone()
    H = H.clone()
    rows, cols = W.shape
    gs = grid.size(cols)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static = [find_params(W[:, i:i + gs], grid) for i in range(0, cols, gs)] if desc_act else None
    perm = torch.argsort(torch.diag(H), descending=True) if desc_act else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    H[range(cols), range(cols)] += damp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    scales, zeros = torch.zeros(rows, cols // gs), torch.zeros(rows, cols // gs)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Err1 = W[:, i1:i2].clone(), torch.zeros(rows, i2 - i1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(perm[col]) // gs
            if static is not None:
                scale, zero = static[g]
            elif col % gs == 0:
                scale, zero = find_params(torch.cat([W1[:, i:], W[:, i2:]], 1)[:, :gs], grid)
            scales[:, g], zeros[:, g] = scale, zero
            w, d = W1[:, i], Hinv1[i, i]
            q = quantize_codes(w[:, None], scale, zero, grid.maxq).flatten()
            Q[:, col] = q
            err = (w - scale * (q - zero)) / d
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q[:, torch.argsort(perm)].int(), scales, zeros.int()


@pytest.mark.parametrize("gs,sym,desc_act", [(64, True, False), (32, False, False), (-1, False, False),
                                              (64, False, True), (128, True, False)])
def test_sync_free_solve_matches_the_reference_loop(gs, sym, desc_act):
    W, X, H = _layer(out_f=48, in_f=384, seed=3)
    H[:, 5] = H[5, :] = 0  # a dead input column
    grid = Grid(4, gs, sym)
    codes, scales, zeros = _reference_gptq(W, H, grid, desc_act=desc_act)
    r = gptq_quantize(W, H, grid, desc_act=desc_act)
    assert torch.equal(r.codes, codes)
    assert torch.equal(r.scales, scales) and torch.equal(r.zeros, zeros)
    d = W - r.dequant()
    d[:, 5] = 0
    want = float((d * (d @ H)).sum() / (W * (W @ H)).sum())
    assert r.error == pytest.approx(want, rel=1e-3)


def test_stacked_solve_of_linears_sharing_an_input_equals_separate_solves():
    from qwen_quant.quantize.gptq import split_rows

    W, _, H = _layer(out_f=96, in_f=256, seed=4)
    grid = Grid(4, 64, True)
    parts = split_rows(gptq_quantize(W, H, grid), [32, 64])
    for part, rows in zip(parts, (slice(0, 32), slice(32, 96))):
        alone = gptq_quantize(W[rows], H, grid)
        assert (part.codes == alone.codes).float().mean() > 0.999  # rows are independent given H
        assert part.error == pytest.approx(alone.error, rel=1e-2)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_torch_packer_is_bit_identical_to_numpy(bits):
    from qwen_quant.formats.bitpack import pack_bits, pack_bits_torch

    rng = np.random.default_rng(bits)
    for shape, axis in (((96, 40), 0), ((24, 160), 1), ((32, 8), 0)):
        c = rng.integers(0, 2**bits, size=shape)
        want = pack_bits(c, bits, axis)
        got = pack_bits_torch(torch.from_numpy(c).int(), bits, axis).numpy()
        assert got.dtype == want.dtype and np.array_equal(got, want)


def test_hessian_sum_matches_the_running_mean():
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(4, 33, 16, generator=g) for _ in range(3)]
    h = Hessian(16, "cpu")
    for x in xs:
        h.add(x)
    flat = torch.cat([x.reshape(-1, 16) for x in xs])
    assert torch.allclose(h.H, 2 / flat.shape[0] * flat.T @ flat, rtol=1e-5, atol=1e-6)


def test_early_stopping_capture_sees_the_same_inputs(untied_model):
    """Capturing q/k/v stops each batch after the norm; the inputs are those of a full forward."""
    from qwen_quant.models import check_model
    from qwen_quant.quantize.layerwise import Layerwise

    src, hf, fam = check_model(str(untied_model))
    lw = Layerwise(str(src), hf, fam, batch_size=2)
    hidden = lw.embed(torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0)))
    layer = lw.load(f"{fam.layers_path}.0")
    seen = {True: [], False: []}
    for stop in (True, False):
        lw.capture(layer, ["self_attn.q_proj", "mlp.gate_proj"], lambda n, x: seen[stop].append((n, x.clone())),
                   hidden, stop=stop)
    assert [n for n, _ in seen[True]] == [n for n, _ in seen[False]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(seen[True], seen[False]))


def test_background_writer_reraises_and_prefetch_returns_the_same_tensors(untied_model, tmp_path):
    from qwen_quant.models import check_model
    from qwen_quant.quantize.layerwise import Layerwise
    from qwen_quant.quantize.overlap import BackgroundWriter

    class Broken:
        def add(self, tensors):
            raise OSError("disk full")

        def abort(self):
            self.aborted = True

    w = BackgroundWriter(Broken())
    w.add({"a": torch.zeros(2)})
    with pytest.raises(OSError, match="disk full"):
        w.drain()
    src, hf, fam = check_model(str(untied_model))
    plain = Layerwise(str(src), hf, fam)
    fetched = Layerwise(str(src), hf, fam)
    fetched.prefetch(f"{fam.layers_path}.1")
    a = plain.load(f"{fam.layers_path}.1").state_dict()
    b = fetched.load(f"{fam.layers_path}.1").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


_KERNEL_CHECK = """
import os, torch
from qwen_quant.quantize import gptq, gptq_triton as gt
from qwen_quant.quantize.grid import Grid
assert gt.HAVE_TRITON
g = torch.Generator().manual_seed(0)
W = torch.randn(40, 256, generator=g) * 0.05
X = torch.randn(600, 256, generator=g) * torch.linspace(0.1, 3, 256)
h = gptq.Hessian(256, "cpu"); h.add(X)
for grid in (Grid(4, 128, True), Grid(4, -1, False)):
    gt.usable = lambda W, width: False
    ref = gptq.gptq_quantize(W, h.H, grid)
    gt.usable = lambda W, width: width == 128   # the kernel, on CPU tensors, in the interpreter
    r = gptq.gptq_quantize(W, h.H, grid)
    assert gt._STATE["ok"] is True
    assert torch.equal(r.codes, ref.codes) and torch.equal(r.scales, ref.scales), grid
print("kernel ok")
"""


def test_triton_column_kernel_matches_the_eager_loop_in_the_interpreter():
    """The Triton kernel (CUDA in production) run by Triton's CPU interpreter gives the eager codes."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (it comes with CUDA torch)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    p = subprocess.run([sys.executable, "-c", _KERNEL_CHECK], capture_output=True, text=True, env=env, timeout=300,
                       cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert p.returncode == 0 and "kernel ok" in p.stdout, p.stderr[-2000:]


@pytest.mark.gpu
def test_triton_column_kernel_matches_the_eager_loop_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from qwen_quant.quantize import gptq_triton

    W, _, H = _layer(out_f=512, in_f=1024, seed=6)
    W, H = W.cuda(), H.cuda()
    os_env = __import__("os").environ
    os_env["QWEN_QUANT_NO_TRITON"] = "1"
    ref = gptq_quantize(W, H, Grid(4, 128, True))
    del os_env["QWEN_QUANT_NO_TRITON"]
    r = gptq_quantize(W, H, Grid(4, 128, True))
    assert gptq_triton._STATE["ok"] is True
    assert torch.equal(r.codes, ref.codes)
