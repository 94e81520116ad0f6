"""Metrics and the eval runner on a trained fixture: identity, perturbation, independent perplexity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qwen_quant.backends import open_backend
from qwen_quant.validate import EvalConfig, evaluate, run_eval
from qwen_quant.validate.metrics import windows

CFG = EvalConfig(ctx=128, max_tokens=2048, greedy_tokens=12, max_prompts=4)


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


# -- device metrics --------------------------------------------------------------------------------

class NumpyReference:
    """The earlier numpy metric path, kept as the reference implementation the device path must equal."""

    def __init__(self):
        self.nll, self.kl, self.top1, self.ref_nll = [], [], [], []

    @staticmethod
    def log_softmax(x):
        x = np.asarray(x, dtype=np.float64)
        m = x.max(-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))

    def add(self, logits, targets, ref_logits):
        lp, lr = self.log_softmax(logits), self.log_softmax(ref_logits)
        idx = np.arange(len(targets))
        self.nll.append(-lp[idx, targets])
        self.ref_nll.append(-lr[idx, targets])
        self.kl.append(np.clip((np.exp(lr) * (lr - lp)).sum(-1), 0, None))
        self.top1.append(ref_logits.argmax(-1) == logits.argmax(-1))

    def result(self):
        nll, kl = np.concatenate(self.nll), np.concatenate(self.kl)
        return {"perplexity": float(np.exp(nll.mean())), "ref_perplexity": float(np.exp(np.concatenate(self.ref_nll).mean())),
                "kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)), "kl_max": float(kl.max()),
                "top1_agreement": float(np.concatenate(self.top1).mean()), "tokens_scored": int(nll.size)}


@pytest.mark.parametrize("chunk_bytes", [2**29, 4 * 1000 * 7])  # one chunk; 7 positions per chunk
def test_device_metrics_equal_numpy_reference(chunk_bytes):
    from qwen_quant.validate.metrics import Accumulator

    g = np.random.default_rng(0)
    acc, ref = Accumulator(chunk_bytes=chunk_bytes), NumpyReference()
    for t in (50, 63, 1):
        lg = (g.standard_normal((t, 1000)) * 3).astype(np.float32)
        rl = lg + g.standard_normal((t, 1000)).astype(np.float32) * 0.5
        tg = g.integers(0, 1000, t)
        ref.add(lg, tg, rl)
        acc.add(torch.from_numpy(lg), torch.from_numpy(tg), rl)  # torch and numpy inputs mixed on purpose
    got, want = acc.result(), ref.result()
    assert got["tokens_scored"] == want["tokens_scored"] == 114
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-5), k


def test_device_metrics_on_model_logits_equal_numpy_reference(untied_model, perturbed):
    from qwen_quant.calib import eval_tokens
    from qwen_quant.models.loader import load_tokenizer

    ids = np.asarray(eval_tokens(load_tokenizer(untied_model), max_tokens=512), dtype=np.int64)[:512].reshape(4, 128)
    with open_backend(perturbed, device="cpu") as a, open_backend(untied_model, device="cpu") as r:
        lg, rl = a.logits(ids), r.logits(ids)
        got = evaluate(a, ids.reshape(-1), EvalConfig(ctx=128, batch_size=3), r)
    ref = NumpyReference()
    for i in range(4):
        ref.add(lg[i, 64:127], ids[i, 65:], rl[i, 64:127])
    for k, v in ref.result().items():
        assert got[k] == pytest.approx(v, rel=1e-5), k


class NumpyOnly:
    """A backend that, like llama.cpp and onnxruntime, only implements the numpy `logits` contract."""

    def __init__(self, inner):
        from qwen_quant.backends.base import Backend

        class _B(Backend):
            name, device, vocab_size = "numpy-only", "cpu", inner.vocab_size

            def logits(self, ids):
                return inner.logits(ids)

            def greedy(self, prompt_ids, n):
                return inner.greedy(prompt_ids, n)

        self.backend = _B()


@pytest.mark.parametrize("method", ["windows", pytest.param("stride", marks=pytest.mark.slow)])
def test_batched_scoring_and_numpy_backends_agree(untied_model, perturbed, method):
    from qwen_quant.calib import eval_tokens
    from qwen_quant.models.loader import load_tokenizer

    tokens = np.asarray(eval_tokens(load_tokenizer(untied_model), max_tokens=1024), dtype=np.int64)
    with open_backend(perturbed, device="cpu") as a, open_backend(untied_model, device="cpu") as r:
        one = evaluate(a, tokens, EvalConfig(ctx=128, method=method, stride=48, batch_size=1), r)
        many = evaluate(a, tokens, EvalConfig(ctx=128, method=method, stride=48, batch_size=5), r)
        np_only = evaluate(NumpyOnly(a).backend, tokens, EvalConfig(ctx=128, method=method, stride=48, batch_size=2), r)
    for m in (many, np_only):
        assert m["tokens_scored"] == one["tokens_scored"]
        for k in ("perplexity", "ref_perplexity", "kl_mean", "kl_p99", "kl_max", "top1_agreement"):
            assert m[k] == pytest.approx(one[k], rel=1e-5), k


def test_batched_greedy_equals_unbatched(untied_model, perturbed):
    from qwen_quant.calib import greedy_prompts
    from qwen_quant.models.loader import load_tokenizer

    prompts = [ids for _, ids in greedy_prompts(load_tokenizer(untied_model))][:3]
    prompts.append(prompts[0][:3])  # very different lengths: heavy left padding
    assert len({len(p) for p in prompts}) > 2
    for model in (perturbed,):
        with open_backend(model, device="cpu") as b:
            batched = b.greedy_batch(prompts, 10)
            single = [b.greedy_batch([p], 10)[0] for p in prompts]
            # the unbatched loop written independently: full recompute, no cache, no padding
            plain = []
            for p in prompts:
                ids = list(p)
                for _ in range(10):
                    ids.append(int(b.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
                plain.append(ids[len(p):])
        assert batched == single == plain


def test_eval_phases_notes_and_reference_reuse(untied_model, perturbed):
    from qwen_quant.validate import References

    refs, cfg = References(), EvalConfig(ctx=128, max_tokens=512, greedy_tokens=4, max_prompts=2)
    try:
        a = run_eval(perturbed, cfg, reference=untied_model, device="cpu", refs=refs)
        b = run_eval(untied_model, cfg, reference=untied_model, device="cpu", refs=refs)
        assert len(refs.backends) == 1 and len(refs.tokens) == 1  # loaded and decoded once for both
    finally:
        refs.close()
    assert set(a.phases) == {"load", "scoring", "greedy"} and all(v >= 0 for v in a.phases.values())
    assert any("reused" in n for n in b.notes)
    assert b.metrics["kl_max"] == 0 and b.metrics["greedy_exact"] == 2
    assert a.metrics["kl_mean"] > 1e-3


def test_multi_gpu_placement_dry_run(untied_model):
    """`--device cuda:0,1`: whole decoder layers over two devices, in order, within each device's budget."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from qwen_quant.backends.torch_backend import plan_device_map
    from qwen_quant.devices import parse

    assert parse("cuda:0,1") == parse("cuda:0,cuda:1") == parse("0,1") == ("cuda", [0, 1])
    cfg = AutoConfig.from_pretrained(str(untied_model))
    cfg.num_hidden_layers, cfg.vocab_size = 8, 1024  # layers dominate the size, as in a 72B model
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[0]] * 8
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() * 4 for p in model.parameters())
    dmap = plan_device_map(model, ["cuda:0", "cuda:1"], max_memory={0: int(total * 0.75), 1: int(total * 0.75)})
    layers = [dmap.get(f"model.layers.{i}") for i in range(8)]
    assert set(dmap.values()) == {"cuda:0", "cuda:1"}
    assert all(d is not None for d in layers), dmap  # never split inside a layer
    first1 = layers.index("cuda:1")
    assert layers[:first1] == ["cuda:0"] * first1 and layers[first1:] == ["cuda:1"] * (8 - first1)


def test_v1_report_still_reads():
    from qwen_quant.report import Report, validate_report

    v1 = {"schema": "qwen-quant/report/v1", "tool": {"name": "qwen-quant", "version": "0.1"}, "created": "2026-01-01T00:00:00+00:00",
          "host": {}, "extra": {},
          "results": [{"artifact": {"path": "a", "format": "gptq", "size_bytes": 1}, "backend": {"name": "torch", "device": "cpu",
                       "dtype": "float32", "versions": {}}, "dataset": {"name": "shipped", "sha256": "0" * 64, "n_tokens": 10},
                       "ctx": 8, "ppl_method": "windows", "metrics": {"perplexity": 2.0, "tokens_scored": 3, "nll_mean": 0.69},
                       "wall_time_s": 1.0, "reference": None, "extra": {}}]}
    validate_report(v1)
    r = Report.from_dict(v1).results[0]
    assert r.phases == {} and r.notes == [] and r.metrics["perplexity"] == 2.0
