"""Recipes end to end on the tiny trained fixtures: the demo (all four formats), skip on rerun, a planted
regression caught by `check`, and the seed recipes on tiny-width stand-ins with the same quirks.

The default set runs demo.yaml and qwen-7b.yaml (Qwen v1 conversion + GPTQ) with ``--smoke`` sizes;
the full-size demo and the other seed recipes are marked slow.
"""

from __future__ import annotations

import base64
import json
import shutil
import time
from pathlib import Path

import pytest

from qwen_quant.recipe import RunConfig, load_recipe, run_recipe
from qwen_quant.report import validate_report

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# seed recipe -> the fixture with its quirks (qwen-7b: the untied MHA fixture rewritten as Qwen v1)
STAND_INS = {"qwen1.5-7b": "qwen2-tiny-untied", "qwen1.5-4b-chat": "qwen2-tiny-untied",
             "qwen1.5-72b-chat": "qwen2-tiny-72b", "qwen2-1.5b": "qwen2-tiny-tied", "qwen-7b": "v1"}


def qwen_v1_from(qwen2_dir: Path, out: Path) -> Path:
    """Write a qwen2 fixture (MHA, untied, qkv bias) as a Qwen v1 checkpoint: fused c_attn, w1/w2, qwen.tiktoken."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    cfg = json.loads((qwen2_dir / "config.json").read_text())
    assert cfg["num_key_value_heads"] == cfg["num_attention_heads"] and not cfg["tie_word_embeddings"]
    sd = load_file(str(qwen2_dir / "model.safetensors"))
    w = {"transformer.wte.weight": sd["model.embed_tokens.weight"], "transformer.ln_f.weight": sd["model.norm.weight"],
         "lm_head.weight": sd["lm_head.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        p, q = f"transformer.h.{i}.", f"model.layers.{i}."
        w |= {p + "ln_1.weight": sd[q + "input_layernorm.weight"], p + "ln_2.weight": sd[q + "post_attention_layernorm.weight"],
              p + "attn.c_proj.weight": sd[q + "self_attn.o_proj.weight"], p + "mlp.w2.weight": sd[q + "mlp.gate_proj.weight"],
              p + "mlp.w1.weight": sd[q + "mlp.up_proj.weight"], p + "mlp.c_proj.weight": sd[q + "mlp.down_proj.weight"]}
        for kind in ("weight", "bias"):
            w[p + f"attn.c_attn.{kind}"] = torch.cat([sd[q + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in w.items()}, str(out / "model.safetensors"))
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 1e6)
    (out / "config.json").write_text(json.dumps({
        "architectures": ["QWenLMHeadModel"], "model_type": "qwen", "hidden_size": h, "num_attention_heads": heads,
        "num_hidden_layers": cfg["num_hidden_layers"], "intermediate_size": 2 * cfg["intermediate_size"],
        "kv_channels": h // heads, "layer_norm_epsilon": cfg["rms_norm_eps"], "rotary_emb_base": rope, "rotary_pct": 1.0,
        "seq_length": cfg["max_position_embeddings"], "max_position_embeddings": cfg["max_position_embeddings"],
        "vocab_size": cfg["vocab_size"], "no_bias": True, "use_dynamic_ntk": True, "use_logn_attn": True,
        "tie_word_embeddings": False, "tokenizer_class": "QWenTokenizer"}))
    dec = {c: b for b, c in bytes_to_unicode().items()}
    vocab = json.loads((qwen2_dir / "tokenizer.json").read_text())["model"]["vocab"]
    ranks = sorted((i, bytes(dec[c] for c in s)) for s, i in vocab.items() if i < 151643)  # BPE ranks; specials follow
    (out / "qwen.tiktoken").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in ranks))
    return out


def _stand_in(name: str, tmp_path: Path) -> str:
    from qwen_quant.fixtures import fixture_path

    fx = STAND_INS[name]
    if fx == "v1":
        return str(qwen_v1_from(fixture_path("qwen2-tiny-untied", quiet=True), tmp_path / "Qwen-7B-tiny"))
    return f"fixture:{fx}"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, tied_model):
    """recipes/demo.yaml with --smoke sizes, run through the CLI entry point."""
    out = tmp_path_factory.mktemp("demo") / "out"
    t0 = time.perf_counter()
    outcome = run_recipe(load_recipe(RECIPES / "demo.yaml", smoke=True), RunConfig(output=str(out)))
    return outcome, out, time.perf_counter() - t0


def test_demo_recipe_builds_and_validates_every_format(demo_run):
    outcome, out, seconds = demo_run
    assert outcome.statuses == {"gptq-int4": "ok", "awq-int4": "ok", "gguf": "ok", "onnx-int4": "ok"}, outcome.report.extra
    d = json.loads((out / "report.json").read_text())
    validate_report(d)
    got = {(r["artifact"]["type"], r["backend"]["name"]) for r in d["results"]}
    assert got == {("gptq-int4", "torch"), ("awq-int4", "torch"), ("gguf-q8_0", "llama.cpp"),
                   ("gguf-q4_k_m", "llama.cpp"), ("onnx-int4", "onnxruntime")}
    assert (out / "gptq-int4" / "config.json").is_file() and (out / "onnx-int4" / "model.onnx").is_file()
    assert json.loads((out / "awq-int4" / "config.json").read_text())["quantization_config"]["quant_method"] == "awq"
    for r in d["results"]:  # every artifact is close to the full-precision model
        assert r["metrics"]["ppl_ratio"] < 1.2 and r["metrics"]["top1_agreement"] > 0.8, r
    assert "| gguf | gguf | ok |" in (out / "report.md").read_text()


def test_rerun_skips_built_artifacts(demo_run, run_cli):
    _, out, first = demo_run
    t0 = time.perf_counter()
    code, stdout, _ = run_cli("run", RECIPES / "demo.yaml", "--smoke", "-o", out, "-q", "--json", out / "again.json")
    seconds = time.perf_counter() - t0
    assert code == 0, stdout
    assert "gptq-int4: cached, awq-int4: cached, gguf: cached, onnx-int4: cached" in stdout
    assert seconds < 30 and seconds < first / 3, (seconds, first)
    assert len(json.loads((out / "again.json").read_text())["results"]) == 5


def test_check_catches_a_damaged_gguf(demo_run, run_cli, tmp_path):
    """Perturb the q8_0 GGUF's weights, validate it again, and gate the new report on the good one."""
    import numpy as np
    from gguf import GGUFReader

    from qwen_quant.recipe.runner import validate

    outcome, out, _ = demo_run
    good = out / "report.json"
    assert run_cli("check", good, "--baseline", good)[0] == 0
    recipe = load_recipe(RECIPES / "demo.yaml", smoke=True)
    q8 = next(Path(p) for p in outcome.report.extra["recipe"]["artifacts"][2]["outputs"] if p.endswith("q8_0.gguf"))
    bad = tmp_path / q8.name
    shutil.copy(q8, bad)
    rng = np.random.default_rng(0)
    for t in GGUFReader(str(bad), "r+").tensors:
        if t.name.startswith("blk.") and t.name.endswith("ffn_down.weight"):
            blocks = t.data.reshape(-1, 34)  # q8_0: fp16 scale + 32 int8
            blocks[:, 2:] = rng.integers(0, 256, blocks[:, 2:].shape, dtype=np.uint8)
    src = Path(outcome.report.extra["recipe"]["source"])
    [damaged] = validate(recipe.artifact("gguf"), [(str(bad), "gguf-q8_0")], src, recipe)
    now = json.loads(good.read_text())
    now["results"] = [damaged if (r["artifact"]["type"], r["backend"]["name"]) == ("gguf-q8_0", "llama.cpp") else r
                      for r in now["results"]]
    (tmp_path / "now.json").write_text(json.dumps(now))
    code, stdout, _ = run_cli("check", tmp_path / "now.json", "--baseline", good, "--max-ppl-increase", "1%")
    assert code == 1, stdout
    lines = [ln for ln in stdout.splitlines() if ln.startswith("REGRESSION")]
    assert lines and all("gguf [gguf-q8_0]" in ln and "llama.cpp" in ln for ln in lines), stdout
    assert any("perplexity" in ln for ln in lines)


def test_seed_recipe_qwen_v1_end_to_end(tmp_path):
    """qwen-7b.yaml: Qwen v1 source -> convert step -> GPTQ int4/int8, on a tiny v1 stand-in; convert is cached."""
    recipe = load_recipe(RECIPES / "qwen-7b.yaml", model=_stand_in("qwen-7b", tmp_path), smoke=True)
    outcome = run_recipe(recipe, RunConfig(output=str(tmp_path / "out")))
    assert outcome.statuses == {"Qwen-7B-Int4": "ok", "Qwen-7B-Int8": "ok"}, outcome.report.extra
    assert (tmp_path / "out" / "Qwen-7B-tiny-qwen2" / "conversion-report.json").is_file()
    ratios = {r.artifact["type"]: r.metrics["ppl_ratio"] for r in outcome.report.results}
    assert ratios["gptq-int8"] < 1.01 and ratios["gptq-int4"] < 1.2, ratios
    again = run_recipe(load_recipe(RECIPES / "qwen-7b.yaml", model=recipe.source.model, smoke=True),
                       RunConfig(output=str(tmp_path / "out")))
    assert set(again.statuses.values()) == {"cached"}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen1.5-7b", "qwen1.5-4b-chat", "qwen1.5-72b-chat", "qwen2-1.5b"])
def test_seed_recipe_end_to_end(name, tmp_path):
    recipe = load_recipe(RECIPES / f"{name}.yaml", model=_stand_in(name, tmp_path), smoke=True)
    outcome = run_recipe(recipe, RunConfig(output=str(tmp_path / "out")))
    assert set(outcome.statuses.values()) == {"ok"}, outcome.report.extra
    n_results = sum(len(a.backends) * (len(a.config.types) if a.type == "gguf" else 1) for a in recipe.artifacts)
    assert len(outcome.report.results) == n_results


@pytest.mark.slow
def test_demo_full_size(tmp_path, run_cli):
    """`qwen-quant demo` as shipped (a few minutes on 2 cores)."""
    code, stdout, _ = run_cli("demo", "-w", tmp_path / "demo", "-q")
    assert code == 0, stdout
    assert len(json.loads((tmp_path / "demo" / "report.json").read_text())["results"]) == 5
