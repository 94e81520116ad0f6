"""fp16-overflow detection (qwen_quant/validate/overflow.py) on the planted fixture and a clean one."""

from __future__ import annotations

import json

import pytest

from qwen_quant.validate import EvalConfig, run_eval
from qwen_quant.validate.overflow import FP16_MAX, chat_prompts, layer_peaks

CFG = EvalConfig(ctx=32, max_tokens=64, greedy_tokens=2, max_prompts=1)  # the check, not the eval, is under test


@pytest.fixture(scope="module")
def planted():
    from qwen_quant.progress import set_quiet
    from qwen_quant.fixtures import fixture_path

    set_quiet(True)
    return fixture_path("qwen2-tiny-untied-fp16overflow")


def _plant_record(path) -> dict:
    rec = json.loads((path / "fixture.json").read_text())["outliers"]
    return rec.get("fp16_overflow", rec)


def test_peaks_find_the_planted_layer_inside_the_mlp(planted, tokenizer_dir):
    """fp32 reference pass: the planted unit passes 65504 in the MLP intermediate while the residual
    stream (down_proj undoes the scale) stays far below it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    prompts = chat_prompts(tok)[:2]
    assert all(p.count(tok.convert_tokens_to_ids("<|im_start|>")) >= 2 for p in prompts)  # ChatML user + assistant turns
    assert tok.decode(prompts[0]).rstrip().endswith("assistant")
    model = AutoModelForCausalLM.from_pretrained(str(planted), dtype="float32").eval()
    peaks, logits = layer_peaks(model, prompts)
    layer = _plant_record(planted)["layer"]
    assert peaks[layer]["mlp_intermediate"] > FP16_MAX
    assert peaks[layer]["residual"] < FP16_MAX / 10
    assert len(logits) == 2 and logits[0].shape[-1] == model.config.vocab_size


def test_fp16_eval_flags_the_planted_fixture(planted):
    r = run_eval(planted, CFG, reference=planted, backend="torch", device="cpu", dtype="float16")
    rep = r.extra["fp16_overflow"]
    assert rep["flagged"] and _plant_record(planted)["layer"] in rep["near_limit_layers"]
    assert rep["peak"] > FP16_MAX and rep["chat"]["nonfinite_positions"] > 0
    assert any(n.startswith("fp16 overflow risk") for n in r.notes)


def test_fp16_eval_of_a_clean_fixture_is_not_flagged(untied_model):
    r = run_eval(untied_model, CFG, reference=untied_model, backend="torch", device="cpu", dtype="float16")
    rep = r.extra["fp16_overflow"]
    assert not rep["flagged"] and rep["near_limit_layers"] == [] and rep["peak"] < FP16_MAX / 10
    assert rep["chat"]["nonfinite_positions"] == 0 and rep["chat"]["top1_agreement"] > 0.9
    assert not any("fp16 overflow" in n for n in r.notes)


def test_only_fp16_runs_are_checked():
    from types import SimpleNamespace

    from qwen_quant.validate.overflow import annotate_fp16, needs_check

    assert needs_check(SimpleNamespace(dtype="float16")) and needs_check(SimpleNamespace(dtype="f16"))
    assert not needs_check(SimpleNamespace(dtype="bfloat16")) and not needs_check(SimpleNamespace(dtype="q4_k_m"))
    result = SimpleNamespace(extra={}, notes=[])
    annotate_fp16(result, SimpleNamespace(dtype="bfloat16"), None, None)
    assert result.extra == {} and result.notes == []
    annotate_fp16(result, SimpleNamespace(dtype="float16"), SimpleNamespace(), None)  # reference is not torch
    assert result.extra == {} and "skipped" in result.notes[0]
