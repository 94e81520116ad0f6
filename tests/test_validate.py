"""Metrics and the eval runner on a trained fixture: identity, perturbation, independent perplexity."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from qwen_quant.backends import open_backend
from qwen_quant.validate import EvalConfig, evaluate, run_eval
from qwen_quant.validate.metrics import windows

CFG = EvalConfig(ctx=128, max_tokens=2048, greedy_tokens=12, max_prompts=4)


@pytest.fixture(scope="module")
def perturbed(untied_model, tmp_path_factory):
    """A copy of the fixture with noise on one layer's MLP."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("perturbed")
    for f in untied_model.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    sd = load_file(str(out / "model.safetensors"))
    w = sd["model.layers.1.mlp.down_proj.weight"]
    sd["model.layers.1.mlp.down_proj.weight"] = w + torch.randn_like(w, generator=torch.Generator().manual_seed(0)) * w.std() * 2
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_self_parity_is_exact(untied_model):
    r = run_eval(untied_model, CFG, reference=untied_model, device="cpu")
    m = r.metrics
    assert m["kl_mean"] == 0.0 and m["kl_max"] == 0.0
    assert m["top1_agreement"] == 1.0
    assert m["greedy_exact"] == m["greedy_prompts"] == 4
    assert m["greedy_prefix_mean"] == 12
    assert m["ppl_ratio"] == pytest.approx(1.0)
    assert 1.0 < m["perplexity"] < 100  # trained: far below the vocab size


def test_perturbed_copy_moves_metrics_the_right_way(untied_model, perturbed):
    r = run_eval(perturbed, CFG, reference=untied_model, device="cpu")
    m = r.metrics
    assert m["kl_mean"] > 1e-3
    assert m["top1_agreement"] < 1.0
    assert m["perplexity"] > m["ref_perplexity"]
    assert m["greedy_prefix_mean"] < 12


def test_perplexity_matches_independent_computation(untied_model):
    """llama-perplexity style: non-overlapping windows, second half scored; recomputed with plain HF loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwen_quant.calib import eval_tokens

    tok = AutoTokenizer.from_pretrained(str(untied_model))
    ids = torch.tensor(eval_tokens(tok, max_tokens=1024)[:1024])
    model = AutoModelForCausalLM.from_pretrained(str(untied_model), dtype=torch.float32).eval()
    ctx, nll, n = 128, 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - ctx + 1, ctx):
            chunk = ids[s:s + ctx][None]
            labels = chunk.clone()
            labels[:, : ctx // 2 + 1] = -100  # score tokens ctx/2+1 .. ctx-1
            loss = model(input_ids=chunk, labels=labels).loss
            k = int((labels[:, 1:] != -100).sum())
            nll, n = nll + float(loss) * k, n + k
    expected = float(np.exp(nll / n))
    with open_backend(untied_model, device="cpu") as b:
        got = evaluate(b, ids.numpy(), EvalConfig(ctx=ctx))
    assert got["tokens_scored"] == n
    assert got["perplexity"] == pytest.approx(expected, rel=1e-4)


def test_stride_windows_score_each_token_once():
    for n, ctx, stride in [(1000, 128, 64), (1000, 128, 32), (129, 128, 32)]:
        scored = []
        for w in windows(n, ctx, "stride", stride):
            scored += [w.start + i + 1 for i in range(w.score_from, ctx - 1)]
        assert scored == list(range(1, scored[-1] + 1))
    # stride == ctx: like HF's recipe, a window's first token has no context and is not scored
    scored = [w.start + i + 1 for w in windows(1000, 128, "stride", 128) for i in range(w.score_from, 127)]
    assert len(scored) == len(set(scored)) == 7 * 127
    w = windows(1024, 128)
    assert len(w) == 8 and all(x.score_from == 64 for x in w)


def test_json_report_validates_against_schema(untied_model, tmp_path, run_cli):
    from qwen_quant.report import validate_report

    out = tmp_path / "r.json"
    code, _, err = run_cli("eval", untied_model, "--reference", untied_model, "--device", "cpu", "--ctx", "128",
                           "--max-tokens", "512", "--greedy-tokens", "4", "--json", out, "-q")
    assert code == 0, err
    d = json.loads(out.read_text())
    validate_report(d)
    r = d["results"][0]
    assert r["backend"]["name"] == "torch" and r["backend"]["versions"]["torch"]
    assert len(r["dataset"]["sha256"]) == 64 and r["ctx"] == 128
    assert r["metrics"]["kl_mean"] == 0.0
    import jsonschema

    bad = json.loads(out.read_text())
    del bad["results"][0]["metrics"]["perplexity"]
    with pytest.raises(jsonschema.ValidationError):
        validate_report(bad)
