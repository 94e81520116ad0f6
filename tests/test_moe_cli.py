"""Every command on qwen3, qwen2_moe and qwen3_moe, through the real console entry point, on tiny random
checkpoints saved by transformers' own classes with each family's quirks:

- qwen3: explicit head_dim 32 != hidden/heads (16), q/k RMSNorm, tied embeddings;
- qwen2_moe: a shared expert behind ``shared_expert_gate``, q/k/v bias, and layer 0 dense through
  ``mlp_only_layers`` (as Qwen2-MoE configs allow);
- qwen3_moe: ``norm_topk_prob``, no shared expert, q/k RMSNorm, head_dim 32.

``info``, ``gptq --bits 4`` (classic and compressed-tensors), ``awq``, ``export gguf --type
q8_0,q4_k_m`` and ``eval`` of each artifact exit 0. llama.cpp's MoE architectures hold experts in
every layer, so the qwen2_moe checkpoint with a dense layer is refused by ``export gguf`` in one line
(exit 2) and its all-sparse twin (Qwen1.5-MoE-A2.7B's layout) is exported instead. qwen3's awq and
gguf runs are slow-marked: the default suite runs them on the trained qwen3 fixture (tests/test_qwen3.py).
"""

from __future__ import annotations

import json
import math

import pytest

from moe_helpers import IDS, family_named, save_tiny

QUANT = ("--bits", "4", "--group-size", "32", "--nsamples", "4", "--seqlen", "64", "--no-validate", "-q")
EVAL = ("--ctx", "64", "--max-tokens", "256", "--greedy-tokens", "4", "--device", "cpu", "-q")
#: the quirk each checkpoint must carry (config.json overrides of moe_helpers.CONFIGS)
VARIANTS = {"qwen3": {}, "qwen2_moe": {"mlp_only_layers": [0], "shared_expert_intermediate_size": 64}, "qwen3_moe": {}}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-cli")
    made = {}

    def get(name: str, **overrides):
        key = (name, json.dumps(overrides, sort_keys=True))
        if key not in made:
            made[key] = save_tiny(family_named(name), root / f"{name}-{len(made)}", **{**VARIANTS[name], **overrides})
        return made[key]

    return get


def _eval(run_cli, art, ref, out):
    code, _, err = run_cli("eval", art, "--reference", ref, *EVAL, "--json", out)
    assert code == 0, err
    res = json.loads(out.read_text())["results"][0]
    m = res["metrics"]
    assert math.isfinite(m["perplexity"]) and math.isfinite(m["kl_mean"]) and m["greedy_prompts"] > 0, m
    assert res["metadata"]["ok"], [c for c in res["metadata"]["checks"] if not c["ok"]]
    return res


@pytest.mark.parametrize("name", IDS)
def test_info(run_cli, ckpt, name):
    code, out, err = run_cli("info", ckpt(name), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["family"] == name
    cfg = json.loads((ckpt(name) / "config.json").read_text())
    if name != "qwen2_moe":
        assert info["qk_norm"] and info["head_dim"] == 32 and "head_dim 32 (not hidden/heads)" in info["quirks"]
    else:
        assert info["qkv_bias"] and cfg["mlp_only_layers"] == [0]
    assert cfg["tie_word_embeddings"] == (name == "qwen3")


#: qwen3's AWQ and GGUF paths run in the default suite on the trained qwen3 fixture (tests/test_qwen3.py,
#: same quirks: explicit head_dim, q/k norms, tied embeddings); here they are slow-marked to keep its budget
def _covered(name: str, *values):
    return pytest.param(name, *values, marks=pytest.mark.slow) if name == "qwen3" else pytest.param(name, *values)


METHODS = (("gptq", "gptq"), ("gptq", "compressed-tensors"), ("awq", "awq"))


@pytest.mark.parametrize("name,method,fmt", [_covered(n, m, f) if m == "awq" else pytest.param(n, m, f)
                                             for n in IDS for m, f in METHODS])
def test_quantize_then_eval(run_cli, ckpt, tmp_path, name, method, fmt):
    src = ckpt(name)
    out = tmp_path / "q"
    code, _, err = run_cli(method, src, "-o", out, "--format", fmt, *QUANT)
    assert code == 0, err
    summary = json.loads((out / "qwen-quant-quantize.json").read_text())
    if name != "qwen3":  # the experts were quantized one by one, each with its routed token count
        assert list(summary["moe"]["routed_tokens"]) == ["model.layers.1.mlp.experts"] if name == "qwen2_moe" else \
            list(summary["moe"]["routed_tokens"]) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    _eval(run_cli, out, src, tmp_path / "r.json")


@pytest.mark.parametrize("name", [_covered(n) for n in IDS])
def test_export_gguf_then_eval(run_cli, ckpt, tmp_path, name):
    pytest.importorskip("llama_cpp")
    src = ckpt(name)
    if name == "qwen2_moe":
        code, _, err = run_cli("export", "gguf", src, "--type", "q8_0", "-o", tmp_path / "refused", "--no-validate", "-q")
        assert code == 2 and len(err.strip().splitlines()) == 1 and "decoder layers [0] have no experts" in err, err
        assert not list((tmp_path / "refused").glob("*.gguf")) if (tmp_path / "refused").exists() else True
        src = ckpt(name, mlp_only_layers=[])
    code, _, err = run_cli("export", "gguf", src, "--type", "q8_0,q4_k_m", "-o", tmp_path, "--no-validate", "-q")
    assert code == 0, err
    kl = {}
    for t in ("q8_0", "q4_k_m"):
        path = tmp_path / f"{src.name}-{t}.gguf"
        kl[t] = _eval(run_cli, path, src, tmp_path / f"{t}.json")["metrics"]["kl_mean"]
    assert kl["q8_0"] < kl["q4_k_m"], kl


def test_expert_tokens_and_fallback_in_summary_and_report_table(run_cli, ckpt, tmp_path):
    """The tokens routed to each expert and the experts rounded to nearest under --moe-min-tokens are in
    qwen-quant-quantize.json, in the JSON report and in the table the command prints."""
    src, out, min_tokens = ckpt("qwen3_moe"), tmp_path / "q", 128
    code, stdout, err = run_cli("gptq", src, "-o", out, *QUANT, "--moe-min-tokens", str(min_tokens),
                                "--json", tmp_path / "report.json")
    assert code == 0, err
    moe = json.loads((out / "qwen-quant-quantize.json").read_text())["moe"]
    assert json.loads((tmp_path / "report.json").read_text())["extra"]["quantize"]["moe"] == moe
    tokens = moe["routed_tokens"]
    assert sorted(tokens) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert all(len(c) == 4 and sum(c) == 4 * 64 * 2 for c in tokens.values())  # every token to its top-2
    low = {(layer, e) for layer, counts in tokens.items() for e, c in enumerate(counts) if c < min_tokens}
    assert 0 < len(low) < 8, tokens  # the threshold splits the experts: both paths ran
    assert sorted(moe["fallback_rtn"]) == sorted(f"{layer}.{e}.{p}" for layer, e in low
                                                 for p in ("gate_proj", "up_proj", "down_proj"))
    assert moe["min_tokens"] == min_tokens and moe["full_precision"] == ["mlp.gate"]
    assert "routed calibration tokens per expert" in stdout
    from qwen_quant.report import Report, to_markdown

    md = to_markdown(Report(extra={"quantize": {"moe": moe}}))
    assert all(f"| {layer} | {' '.join(map(str, c))} |" in md for layer, c in tokens.items()), md
    for layer, counts in tokens.items():
        row = next(line for line in stdout.splitlines() if layer in line)
        assert " ".join(map(str, counts)) in row
        for e, c in enumerate(counts):
            assert (f"{e} ({c})" in row) == ((layer, e) in low), row
