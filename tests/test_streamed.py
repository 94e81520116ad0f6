"""Layer-streamed evaluation (validate/streamed.py) equals whole-model evaluation, and is picked by itself."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qwen_quant.backends import open_backend
from qwen_quant.validate import EvalConfig, run_eval, score
from qwen_quant.validate.streamed import evaluate_streamed, model_bytes, plan

CFG = EvalConfig(ctx=128, max_tokens=512, greedy_tokens=4, max_prompts=2)
KEYS = ("perplexity", "ref_perplexity", "kl_mean", "kl_p99", "kl_max", "top1_agreement")


@pytest.fixture(scope="module")
def tokens(untied_model):
    from qwen_quant.calib import eval_tokens
    from qwen_quant.models.loader import load_tokenizer

    return np.asarray(eval_tokens(load_tokenizer(untied_model), max_tokens=1024), dtype=np.int64)


@pytest.fixture(scope="module")
def gptq_artifact(untied_model, tmp_path_factory):
    from qwen_quant.calib import CalibConfig
    from qwen_quant.quantize import RTNConfig, quantize_model

    out = tmp_path_factory.mktemp("gptq") / "q"
    cfg = RTNConfig(model=str(untied_model), output=str(out), device="cpu", validate=False,
                      calib=CalibConfig(nsamples=4, seqlen=64))
    return quantize_model(cfg)[0]


def _whole(artifact, reference, tokens, cfg):
    with open_backend(artifact, device="cpu", dtype="float32") as a, open_backend(reference, device="cpu", dtype="float32") as r:
        return score(a, tokens, cfg, r)


def _agree(streamed: dict, whole: dict) -> None:
    assert streamed["tokens_scored"] == whole["tokens_scored"]
    for k in KEYS:
        assert streamed[k] == pytest.approx(whole[k], rel=1e-5, abs=1e-5), k


@pytest.mark.parametrize("method", ["windows", pytest.param("stride", marks=pytest.mark.slow)])
def test_streamed_equals_whole_model_fp32(untied_model, perturbed, tokens, method):
    cfg = EvalConfig(ctx=128, method=method, stride=96)
    s = evaluate_streamed(perturbed, untied_model, tokens, cfg, device="cpu", dtype=torch.float32)
    w = _whole(perturbed, untied_model, tokens, cfg)
    _agree(s, w)
    assert s["kl_mean"] > 1e-4  # a real difference was measured, not 0 == 0


def test_streamed_equals_whole_model_gptq_artifact(untied_model, gptq_artifact, tokens):
    cfg = EvalConfig(ctx=128)
    phases, stats = {}, {}
    s = evaluate_streamed(gptq_artifact, untied_model, tokens, cfg, device="cpu", dtype=torch.float32, phases=phases, stats=stats)
    _agree(s, _whole(gptq_artifact, untied_model, tokens, cfg))
    assert s["kl_mean"] > 0 and s["top1_agreement"] < 1
    assert set(phases) == {"load", "scoring"} and len(stats["layer_s"]) == 2


def test_streamed_tied_self_parity(tied_model, tokens):
    m = evaluate_streamed(tied_model, tied_model, tokens, EvalConfig(ctx=128), device="cpu", dtype=torch.float32)
    assert m["kl_max"] == pytest.approx(0, abs=1e-6) and m["top1_agreement"] == 1.0
    assert m["perplexity"] == pytest.approx(m["ref_perplexity"])


def test_run_eval_streamed_records_mode_phases_and_greedy(untied_model, perturbed):
    whole = run_eval(perturbed, CFG, reference=untied_model, device="cpu", streamed=False)
    r = run_eval(perturbed, CFG, reference=untied_model, device="cpu", streamed=True)
    assert r.backend["name"] == "torch-streamed" and whole.backend["name"] == "torch"
    assert any(n.startswith("streamed") for n in r.notes) and not any(n.startswith("streamed") for n in whole.notes)
    assert set(r.phases) >= {"load", "scoring", "greedy"} and set(whole.phases) >= {"load", "scoring", "greedy"}
    for k in KEYS:
        assert r.metrics[k] == pytest.approx(whole.metrics[k], rel=1e-5, abs=1e-5), k
    for k in ("greedy_prefix_mean", "greedy_exact", "greedy_prompts"):  # greedy: whole models, one after the other
        assert r.metrics[k] == whole.metrics[k]


def test_plan_picks_streamed_when_models_do_not_fit(untied_model):
    one = model_bytes(untied_model, 4)
    assert plan(untied_model, ["cpu"], 4, 0, free=10 * one)[:2] == (False, "together")
    streamed, greedy, notes = plan(untied_model, ["cuda:0"], 4, 0, free=int(1.5 * one))
    assert (streamed, greedy) == (True, "sequential") and "do not fit on cuda:0" in notes[0]
    streamed, greedy, notes = plan(untied_model, ["cuda:0"], 4, 0, free=one // 2)
    assert (streamed, greedy) == (True, "skip") and "greedy parity skipped" in notes[-1]
    assert plan(untied_model, ["cuda:0"], 4, 0, streamed=False, free=1)[0] is False  # --no-streamed wins
    # Qwen2-72B at bf16: the estimate matches the published parameter count (72.7B)
    cfg72 = {"hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80, "vocab_size": 152064,
             "num_attention_heads": 64, "num_key_value_heads": 8, "tie_word_embeddings": False}
    from unittest import mock

    with mock.patch("qwen_quant.models.loader.load_config", return_value=cfg72):
        assert model_bytes("x", 1) / 1e9 == pytest.approx(72.7, abs=0.1)


def test_cli_streamed_report_validates(untied_model, perturbed, tmp_path, run_cli):
    from qwen_quant.report import validate_report

    out = tmp_path / "r.json"
    code, _, err = run_cli("eval", perturbed, "--reference", untied_model, "--device", "cpu", "--ctx", "128",
                           "--max-tokens", "512", "--greedy-tokens", "0", "--streamed", "--json", out, "-q")
    assert code == 0, err
    d = json.loads(out.read_text())
    validate_report(d)
    r = d["results"][0]
    assert r["backend"]["name"] == "torch-streamed" and r["phases"]["scoring"] > 0 and r["notes"]
