"""Qwen3 (dense) through every command, on a trained checkpoint saved by transformers' Qwen3ForCausalLM.

The family file (qwen_quant/models/families/qwen3.py) is the only place that knows Qwen3; these
tests show that every path takes it: info, GPTQ, AWQ, eval on torch, GGUF on llama.cpp, ONNX on
onnxruntime, with the quirks that differ from qwen2 (no qkv bias, q/k norms, explicit head_dim).
"""

from __future__ import annotations

import json

import pytest

EVAL = ("--ctx", "128", "--max-tokens", "2048", "--greedy-tokens", "8", "--device", "cpu")


def _eval(run_cli, art, ref, out, *extra):
    code, _, err = run_cli("eval", art, "--reference", ref, *EVAL, "--json", out, "-q", *extra)
    assert code == 0, err
    return json.loads(out.read_text())["results"][0]


def test_info_names_the_qwen3_quirks(run_cli, qwen3_model):
    code, out, _ = run_cli("info", qwen3_model, "--json")
    assert code == 0
    info = json.loads(out)
    assert info["family"] == "qwen3" and info["head_dim"] == 64 and not info["qkv_bias"] and info["qk_norm"]
    assert "qk-norm" in info["quirks"] and "head_dim 64 (not hidden/heads)" in info["quirks"]


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_quantized_qwen3_loads_and_stays_close(run_cli, qwen3_model, tmp_path, method):
    out = tmp_path / method
    code, _, err = run_cli(method, qwen3_model, "-o", out, "--bits", "4", "--nsamples", "8", "--seqlen", "128",
                           "--no-validate", "-q")
    assert code == 0, err
    names = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) \
        if (out / "model.safetensors.index.json").exists() else None
    if names is None:
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), "pt") as f:
            names = set(f.keys())
    assert "model.layers.0.self_attn.q_norm.weight" in names and "model.layers.0.self_attn.q_proj.qweight" in names
    assert not any(n.endswith("q_proj.bias") for n in names)  # no qkv bias invented
    m = _eval(run_cli, out, qwen3_model, tmp_path / "r.json")["metrics"]
    assert m["kl_mean"] < 0.02 and m["top1_agreement"] > 0.9 and m["ppl_ratio"] < 1.05


def test_qwen3_gguf_runs_on_llama_cpp(run_cli, qwen3_model, tmp_path):
    import gguf

    code, _, err = run_cli("export", "gguf", qwen3_model, "--type", "q8_0", "-o", tmp_path, "--no-validate", "-q")
    assert code == 0, err
    path = tmp_path / f"{qwen3_model.name}-q8_0.gguf"
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "qwen3"
    assert reader.fields["qwen3.attention.key_length"].contents() == 64
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= names and "output.weight" not in names
    assert not any(n.endswith("attn_q.bias") for n in names)
    m = _eval(run_cli, path, qwen3_model, tmp_path / "r.json")
    assert m["metrics"]["kl_mean"] < 0.01 and m["metrics"]["top1_agreement"] > 0.95
    assert m["metadata"]["ok"], m["metadata"]


def test_qwen3_onnx_runs_on_onnxruntime(run_cli, qwen3_model, tmp_path):
    out = tmp_path / "onnx"
    code, _, err = run_cli("export", "onnx", qwen3_model, "-o", out, "--no-validate", "-q")
    assert code == 0, err
    assert json.loads((out / "genai_config.json").read_text())["model"]["type"] == "qwen3"
    m = _eval(run_cli, out, qwen3_model, tmp_path / "r.json")["metrics"]
    assert m["kl_mean"] < 1e-4 and m["top1_agreement"] > 0.99
