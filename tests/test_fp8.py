"""FP8: `qwen-quant fp8` layouts, the W8A8 reference, transformers loading our checkpoints, integrity, quality."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen_quant.formats import fp8 as F


@pytest.fixture(scope="module")
def random_qwen2(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random Qwen2 saved by Qwen2ForCausalLM; hidden 192 and intermediate 320 are not multiples of 128."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = tmp_path_factory.mktemp("rnd") / "qwen2-rnd"
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=192, intermediate_size=320, num_attention_heads=3, num_key_value_heads=1,
                      num_hidden_layers=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=1024)
    Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    for f in Path(tokenizer_dir).iterdir():
        if f.name.startswith(("tokenizer", "vocab", "merges")):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def fp8_block(random_qwen2, tmp_path_factory) -> Path:
    from qwen_quant.quantize.fp8 import FP8Config, quantize_fp8

    out = tmp_path_factory.mktemp("fp8") / "block"
    quantize_fp8(FP8Config(model=str(random_qwen2), output=str(out), device="cpu", validate=False))
    return out


def _header(d: Path) -> dict:
    from qwen_quant.formats.integrity import safetensors_header

    return {k: v for f in d.glob("*.safetensors") for k, v in safetensors_header(f).items()}


def test_cli_writes_qwen_layout_and_validates(random_qwen2, tmp_path, run_cli):
    out = tmp_path / "fp8"
    code, stdout, err = run_cli("fp8", random_qwen2, "-o", out, "--device", "cpu", "--ctx", "128", "--max-tokens", "512",
                                "--json", tmp_path / "r.json", "-q")
    assert code == 0, err
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["fmt"] == "e4m3" and qc["weight_block_size"] == [128, 128]
    assert qc["activation_scheme"] == "dynamic"
    assert {"lm_head", "model.embed_tokens", "model.norm", "model.layers.0.input_layernorm"} <= set(qc["modules_to_not_convert"])
    h = _header(out)
    w, s = h["model.layers.0.mlp.down_proj.weight"], h["model.layers.0.mlp.down_proj.weight_scale_inv"]
    assert w["dtype"] == "F8_E4M3" and w["shape"] == [192, 320]
    assert s["dtype"] == "F32" and s["shape"] == [2, 3]  # ceil(192/128) x ceil(320/128)
    assert h["model.embed_tokens.weight"]["dtype"] == "BF16" and h["model.norm.weight"]["dtype"] == "BF16"
    res = json.loads((tmp_path / "r.json").read_text())["results"][0]
    assert res["artifact"]["type"] == "fp8-block"
    assert res["metrics"]["kl_mean"] < 0.01 and res["metrics"]["top1_agreement"] > 0.8  # random weights: near-tied logits


def test_block_grid_partial_blocks_round_trip():
    w = torch.randn(200, 300)
    q, s = F.quantize_block(w)
    assert q.dtype == F.E4M3 and s.shape == (2, 3)
    rel = (F.dequantize(q, s) - w).norm() / w.norm()
    assert 0.005 < rel < 0.05  # e4m3: 3 mantissa bits
    q, s = F.quantize_channel(w)
    assert s.shape == (200, 1) and (F.dequantize(q, s, None) - w).norm() / w.norm() < 0.05


def _kernel_order(x, q, s, block=128):
    """The Triton block kernel's accumulation: per 128-wide K block, an fp32 sum of fp8 products, then x_scale * w_scale."""
    o, k = q.shape
    xg = x.float().unflatten(-1, (-1, block))
    xs = xg.abs().amax(-1, keepdim=True) / F.FP8_MAX
    xq = (xg / xs).to(F.E4M3).float()
    y = torch.zeros(x.shape[0], o)
    for kb in range(k // block):
        part = xq[:, kb] @ q[:, kb * block:(kb + 1) * block].float().T
        y += part * xs[:, kb] * s[:, kb].repeat_interleave(block)[:o]
    return y


def test_w8a8_reference_documented_differences():
    torch.manual_seed(0)
    w, x = torch.randn(256, 384) * 0.05, torch.randn(64, 384)
    q, s = F.quantize_block(w)
    lin = F.W8A8Linear(q, s, None, 128, 128, torch.float32)
    y = lin(x)
    dense = x @ F.dequantize(q, s).T
    rel_act = ((y - dense).norm() / dense.norm()).item()
    assert 0.005 < rel_act < 0.05, rel_act  # the activation rounding that weight-only dequantization misses
    kern = _kernel_order(x, q, s)
    rel_acc = ((y - kern).norm() / kern.norm()).item()
    assert rel_acc < 1e-5, rel_acc  # accumulation order only: float32 rounding


def test_transformers_loads_our_checkpoint_same_logits(tied_model, tmp_path):
    """transformers' CPU dequantization needs whole 128 blocks (its GPU kernel and vLLM take partial ones):
    the trained fixture's dimensions are multiples of 128."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    from qwen_quant.quantize.fp8 import FP8Config, quantize_fp8

    fp8_block = tmp_path / "fp8"
    quantize_fp8(FP8Config(model=str(tied_model), output=str(fp8_block), device="cpu", validate=False))

    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(str(fp8_block), dtype=torch.float32,
                                              quantization_config=FineGrainedFP8Config(dequantize=True)).eval()
    ours = F.load_w8a8(fp8_block)
    with torch.inference_mode():
        a = hf(ids).logits
        b = ours(ids).logits
        for m in ours.modules():
            if isinstance(m, F.W8A8Linear):
                m.activations = False
        c = ours(ids).logits
    # transformers on a CPU dequantizes the weights only: equal to our reference without activation rounding
    assert (a - c).abs().max() < 1e-4
    assert (a - b).abs().max() > 1e-4  # and our W8A8 reference does differ from it


@pytest.mark.parametrize("scheme", ["block", "dynamic"])
def test_compressed_tensors_decompress_same_weights(random_qwen2, tmp_path, scheme):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from qwen_quant.quantize.fp8 import FP8Config, quantize_fp8

    out = tmp_path / scheme
    quantize_fp8(FP8Config(model=str(random_qwen2), output=str(out), format="compressed-tensors", scheme=scheme,
                           device="cpu", validate=False))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    grp = qc["config_groups"]["group_0"]
    assert qc["format"] == "float-quantized" and grp["weights"]["strategy"] == ("block" if scheme == "block" else "channel")
    m = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32,
                                             quantization_config=CompressedTensorsConfig(dequantize=True))
    h = _header(out)
    assert h["model.layers.1.self_attn.o_proj.weight_scale"]["shape"] == ([2, 2] if scheme == "block" else [192, 1])
    ours = F.load_w8a8(out)
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.k_proj"):
        a = m.get_submodule(name).weight.float()
        b = ours.get_submodule(name)._dense
        assert torch.allclose(a, b, rtol=1e-2, atol=1e-6), name  # compressed-tensors dequantizes to the model dtype


def _fault(src: Path, dst: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("fault,needle", [
    (lambda sd: sd.pop("model.layers.0.mlp.up_proj.weight_scale_inv"), "weight_scale_inv is missing"),
    (lambda sd: sd.update({"model.layers.0.mlp.up_proj.weight_scale_inv":
                           sd["model.layers.0.mlp.up_proj.weight_scale_inv"][:, :1].contiguous()}), "weight_block_size"),
    (lambda sd: sd.update({"model.layers.1.self_attn.q_proj.weight":
                           sd["model.layers.1.self_attn.q_proj.weight"].float()}), "expected F8_E4M3"),
    (lambda sd: sd.update({"model.layers.1.self_attn.q_proj.weight_scale_inv":
                           sd["model.layers.1.self_attn.q_proj.weight_scale_inv"].to(torch.int32)}), "float scale"),
])
def test_integrity_faults_exit_2(fp8_block, tmp_path, run_cli, fault, needle):
    bad = _fault(fp8_block, tmp_path / "bad", fault)
    code, _, err = run_cli("eval", bad, "--max-tokens", "256", "--greedy-tokens", "0", "-q")
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], err


FP8_HARD = "qwen2-tiny-tied-outliers"
FP8_MAX_KL = 0.004  # FP8 block on the hard fixture: measured 1.4e-3 (docs/benchmarks.md); the x1.1 fault: 3.9e-2


def _scale_fault(src: Path, dst: Path, layer: int = 1, factor: float = 1.1) -> Path:
    """Every weight scale of one decoder layer times ``factor`` (the same edit as bench/fp8_quality.py)."""
    return _fault(src, dst, lambda sd: sd.update({k: v * factor for k, v in sd.items()
                                                   if f".layers.{layer}." in k and k.endswith("weight_scale_inv")}))


@pytest.fixture(scope="module")
def hard_fp8(tmp_path_factory):
    from qwen_quant.backends import open_backend
    from qwen_quant.calib import eval_tokens
    from qwen_quant.models import load_tokenizer
    from qwen_quant.progress import set_quiet
    from qwen_quant.quantize.fp8 import FP8Config, quantize_fp8
    from qwen_quant.fixtures import fixture_path
    from qwen_quant.validate import EvalConfig, evaluate

    set_quiet(True)
    src = fixture_path(FP8_HARD)
    out = tmp_path_factory.mktemp("hard") / "fp8"
    quantize_fp8(FP8Config(model=str(src), output=str(out), device="cpu", validate=False))
    ev = EvalConfig(ctx=128, max_tokens=1024, greedy_tokens=0)
    tokens = np.asarray(eval_tokens(load_tokenizer(src), max_tokens=ev.max_tokens), dtype=np.int64)
    ref = open_backend(src, device="cpu", dtype="float32")

    def measure(path):
        with open_backend(path, device="cpu") as b:
            return evaluate(b, tokens, ev, ref)

    yield out, measure
    ref.close()


def test_fp8_block_within_kl_on_hard_fixture(hard_fp8):
    out, measure = hard_fp8
    m = measure(out)
    assert m["kl_mean"] < FP8_MAX_KL, m


def test_fp8_scale_fault_fails_the_same_bar(hard_fp8, tmp_path):
    out, measure = hard_fp8
    m = measure(_scale_fault(out, tmp_path / "fault"))
    assert m["kl_mean"] >= FP8_MAX_KL, m


def test_check_knows_the_fp8_class():
    from qwen_quant.check import TYPE_DEFAULTS, artifact_class

    assert artifact_class({"artifact": {"type": "fp8-block", "format": "fp8"}, "backend": {"dtype": "float32"}}) == "fp8"
    assert artifact_class({"artifact": {"type": "fp8-dynamic", "format": "compressed-tensors"}}) == "fp8"
    assert TYPE_DEFAULTS["fp8"]["max_kl"] > TYPE_DEFAULTS["float"]["max_kl"]


def test_recipe_accepts_fp8_artifact(tmp_path):
    from qwen_quant.recipe import load_recipe

    r = tmp_path / "r.yaml"
    r.write_text("name: t\nsource: {model: fixture:qwen2-tiny-tied}\nartifacts:\n"
                 "  - {name: fp8-block, type: fp8}\n"
                 "  - {name: fp8-dyn, type: fp8, format: compressed-tensors, scheme: dynamic}\n")
    rec = load_recipe(r)
    assert [a.config.artifact_type for a in rec.artifacts] == ["fp8-block", "fp8-dynamic"]
    r.write_text("name: t\nsource: {model: fixture:qwen2-tiny-tied}\nartifacts:\n  - {name: x, type: fp8, scheme: dynamic}\n")
    with pytest.raises(Exception, match="block-wise only"):
        load_recipe(r)


@pytest.mark.slow
def test_gpu_bench_runs_tiny_on_cpu(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "r.json"
    subprocess.run([sys.executable, str(root / "bench" / "fp8_gpu.py"), "--tiny", "--out", str(out)], check=True,
                   cwd=root, capture_output=True)
    r = json.loads(out.read_text())
    assert r["speed"]["qwen-quant fp8 block"]["extrapolated_80_layers_s"] > 0
    v = r["validation"]
    assert v["w8a8_cpu_vs_fp32"]["kl_mean"] < 0.005 and v["transformers_vs_w8a8_cpu"]["top1"] > 0.95
