"""GGUF export of the hybrid linear-attention families (qwen3_next, qwen3_5 text and multimodal,
qwen3_5_moe) on tiny random checkpoints saved by transformers' own classes, run on llama.cpp.

What llama.cpp's converter does to these tensors (A = -exp(A_log), norms + 1, conv1d squeezed,
Qwen3-Next's in_proj_qkvz split, Qwen3.5's value heads tiled) is checked against transformers'
modules here; byte identity with the converter itself needs its script, which is not shipped: set
QWEN_QUANT_LLAMACPP_CONVERT to a llama.cpp checkout's convert_hf_to_gguf.py (a llama.cpp with the
qwen3next / qwen35 / qwen35moe architectures) to run that test; it compares against
``convert_hf_to_gguf.py --no-mtp``, the text GGUF without the MTP draft head.
"""

from __future__ import annotations

import json
import os
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from gguf_helpers import eval_ids, gguf_logits, mean_kl  # noqa: E402
from hybrid_helpers import build  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("qwen3_next", "qwen3_5_text", "qwen3_5", "qwen3_5_moe_text")
ARCH = {"qwen3_next": "qwen3next", "qwen3_5_text": "qwen35", "qwen3_5": "qwen35", "qwen3_5_moe_text": "qwen35moe"}


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer_dir):
    """kind -> (checkpoint, its F16 GGUF), built once per module."""
    from qwen_quant.export.gguf import write_float_gguf

    root = tmp_path_factory.mktemp("hybrid-gguf")

    @lru_cache(maxsize=None)
    def get(kind: str) -> tuple[Path, Path]:
        src = build(kind, root / kind, tokenizer_dir, tied=kind == "qwen3_5_text", mtp=kind == "qwen3_5",
                    experts=kind == "qwen3_next")
        return src, write_float_gguf(src, root / f"{kind}-f16.gguf", "f16")

    return get


def _reader(path: Path):
    import gguf

    r = gguf.GGUFReader(path)
    return r, {t.name: t for t in r.tensors}


def _state(src: Path) -> dict:
    from safetensors.torch import load_file

    return {k.replace("model.language_model.", "model."): v.float() for k, v in load_file(src / "model.safetensors").items()}


def _torch_logits(src: Path, ids: np.ndarray) -> np.ndarray:
    import torch

    from qwen_quant.models.loader import load_model

    with torch.inference_mode():
        return load_model(src)(torch.as_tensor(ids)).logits.float().numpy()


@pytest.mark.parametrize("kind", KINDS)
def test_keys_and_tensors_are_llama_cpps(built, kind):
    """Architecture, recurrent-layer keys, tensor names and types; multimodal: no vision or MTP tensor."""
    import gguf

    src, path = built(kind)
    r, t = _reader(path)
    arch = r.fields["general.architecture"].contents()
    assert arch == ARCH[kind]
    field = lambda key: r.fields[f"{arch}.{key}"].contents()  # noqa: E731
    assert field("block_count") == 4 and field("full_attention_interval") == 4
    assert field("ssm.conv_kernel") == 4 and field("ssm.state_size") == 32 and field("ssm.group_count") == 2
    assert field("ssm.time_step_rank") == 4 and field("ssm.inner_size") == 128
    assert field("rope.dimension_count") == 4  # head_dim 16 x partial_rotary_factor 0.25
    if arch != "qwen3next":
        assert list(field("rope.dimension_sections")) == [1, 1, 0, 0]  # the config's, padded to 4
    for i in range(3):  # Gated DeltaNet layers
        assert {f"blk.{i}.{n}" for n in ("attn_qkv.weight", "attn_gate.weight", "ssm_a", "ssm_dt.bias",
                                         "ssm_conv1d.weight", "ssm_norm.weight", "ssm_out.weight")} <= set(t)
        assert t[f"blk.{i}.ssm_conv1d.weight"].tensor_type == gguf.GGMLQuantizationType.F32
        assert not any(n.startswith(f"blk.{i}.attn_q.") for n in t)
    assert {"blk.3.attn_q.weight", "blk.3.attn_k.weight", "blk.3.attn_q_norm.weight", "blk.3.attn_output.weight"} <= set(t)
    assert [int(n) for n in t["blk.3.attn_q.weight"].shape] == [64, 2 * 4 * 16]  # query + output gate
    if arch == "qwen35":
        assert "blk.0.ssm_beta.weight" in t and "blk.0.ssm_alpha.weight" in t and "blk.0.ffn_up.weight" in t
    else:
        assert ("blk.0.ssm_ba.weight" in t) == (arch == "qwen3next")
        assert {"blk.0.ffn_gate_exps.weight", "blk.0.ffn_gate_inp_shexp.weight", "blk.0.ffn_up_shexp.weight"} <= set(t)
        assert t["blk.0.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert ("output.weight" in t) == (kind != "qwen3_5_text")  # tied: llama.cpp reads token_embd
    assert len(t) == len({n for n in t})
    if kind == "qwen3_5":
        assert not any("visual" in n or "mtp" in n or "nextn" in n for n in t)
        assert f"{arch}.nextn_predict_layers" not in r.fields


@pytest.mark.parametrize("kind", ["qwen3_next", "qwen3_5_text"])
def test_tensor_transforms_match_transformers(built, kind):
    """The converter's transforms, checked against transformers' own modules: A = -exp(A_log), RMSNorm
    weights + 1 (the gated norm unchanged), conv1d [C, K]; qwen3_next's in_proj_qkvz splits into the
    q, k, v and z transformers' layer computes; qwen3_5's value heads are tiled over key heads."""
    import torch
    from transformers import AutoModelForCausalLM

    src, path = built(kind)
    _, t = _reader(path)
    sd = _state(src)
    data = lambda n: torch.from_numpy(np.asarray(t[n].data).astype(np.float32))  # noqa: E731
    la = "model.layers.0.linear_attn"
    nk, nv, hk, hv = 2, 4, 32, 32
    tile = torch.arange(nv).view(nk, nv // nk).t().reshape(-1)  # new head j holds old head tile[j]
    a = -torch.exp(sd[f"{la}.A_log"])
    want_a = a if kind == "qwen3_next" else a[tile]
    torch.testing.assert_close(data("blk.0.ssm_a"), want_a, rtol=0, atol=0)
    torch.testing.assert_close(data("blk.0.attn_norm.weight"), sd["model.layers.0.input_layernorm.weight"] + 1, rtol=0, atol=0)
    torch.testing.assert_close(data("blk.3.attn_q_norm.weight"), sd["model.layers.3.self_attn.q_norm.weight"] + 1, rtol=0, atol=0)
    torch.testing.assert_close(data("blk.0.ssm_norm.weight"), sd[f"{la}.norm.weight"], rtol=0, atol=0)
    assert tuple(t["blk.0.ssm_conv1d.weight"].shape) == (4, 2 * nk * hk + nv * hv)  # GGML order: kernel, channels
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    layer = model.model.layers[0].linear_attn
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(0))
    qkv, z = data("blk.0.attn_qkv.weight").half().float(), data("blk.0.attn_gate.weight")
    with torch.no_grad():
        if kind == "qwen3_next":  # transformers' own split of the interleaved projection
            q, k, v, zz, _, _ = layer.fix_query_key_value_ordering(layer.in_proj_qkvz(x), layer.in_proj_ba(x))
            want_qkv = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], -1)
            want_z = zz.flatten(2)
        else:
            want_qkv, want_z = layer.in_proj_qkv(x), layer.in_proj_z(x)
            v = want_qkv[..., 2 * nk * hk:].view(1, 5, nv, hv)[:, :, tile]
            want_qkv = torch.cat([want_qkv[..., :2 * nk * hk], v.flatten(2)], -1)
            want_z = want_z.view(1, 5, nv, hv)[:, :, tile].flatten(2)
            got_b = x @ data("blk.0.ssm_beta.weight").t()
            torch.testing.assert_close(got_b, layer.in_proj_b(x)[..., tile], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(x @ qkv.t(), want_qkv, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(x @ z.half().float().t(), want_z, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_runs_on_llama_cpp_close_to_torch(built, kind, tmp_path):
    """f16 on llama.cpp against transformers fp32; q8_0 stays close; q4_k_m loads and runs (KL printed)."""
    from qwen_quant.export.gguf_quant import quantize_gguf

    src, f16 = built(kind)
    ids = eval_ids(1, 64)
    ref = _torch_logits(src, ids)
    kl = {"f16": mean_kl(ref, gguf_logits(f16, rows=1, seq=64))}
    for qt in ("q8_0", "q4_k_m"):
        got = gguf_logits(quantize_gguf(f16, tmp_path / f"{qt}.gguf", qt), rows=1, seq=64)
        assert np.isfinite(got).all()
        kl[qt] = mean_kl(ref, got)
    print(f"{kind} KL vs torch fp32: " + ", ".join(f"{k} {v:.2e}" for k, v in kl.items()))
    assert kl["f16"] < 1e-4 and kl["q8_0"] < 1e-3
    assert kl["q4_k_m"] > kl["q8_0"]


@pytest.mark.slow
def test_export_and_eval_on_llama_cpp(run_cli, built, tmp_path):
    """`export gguf` on the multimodal checkpoint, then `eval` of the q8_0 file on the llama.cpp backend
    against the checkpoint's own text model."""
    src, _ = built("qwen3_5")
    out = tmp_path / "g"
    code, _, err = run_cli("export", "gguf", src, "-o", out, "--type", "q8_0", "--no-validate", "-q")
    assert code == 0, err
    (gguf_file,) = out.glob("*-q8_0.gguf")
    code, _, err = run_cli("eval", gguf_file, "--reference", src, "--ctx", "32", "--max-tokens", "128",
                           "--greedy-tokens", "2", "--device", "cpu", "--json", tmp_path / "r.json", "-q")
    assert code == 0, err
    res = json.loads((tmp_path / "r.json").read_text())["results"][0]
    assert res["backend"]["name"] == "llama.cpp"
    assert res["metrics"]["kl_mean"] < 1e-3 and 0.95 < res["metrics"]["ppl_ratio"] < 1.05


def test_qwen3_next_without_experts_refused_in_one_line(run_cli, tokenizer_dir, tmp_path):
    """llama.cpp's qwen3next has routed experts in every layer: a dense-MLP checkpoint cannot be written."""
    src = build("qwen3_next", tmp_path / "dense", tokenizer_dir)
    code, _, err = run_cli("export", "gguf", src, "-o", tmp_path / "x", "--type", "f16", "--no-validate")
    assert code == 2 and "Traceback" not in err
    line = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert len(line) == 1 and "qwen3next" in line[0] and "experts" in line[0]
    assert not list((tmp_path / "x").glob("*.gguf")) if (tmp_path / "x").exists() else True


def test_mrope_sections_that_do_not_fit_refused_in_one_line(run_cli, built, tmp_path):
    """Without mrope_section the converter writes Qwen3.5's [11, 11, 10, 0] (32 pairs), which llama.cpp
    aborts on for a 16-wide head: refused before any file is written."""
    import shutil

    src, _ = built("qwen3_5_text")
    bad = tmp_path / "m"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    del cfg["rope_parameters"]["mrope_section"]
    (bad / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli("export", "gguf", bad, "-o", tmp_path / "x", "--type", "f16", "--no-validate")
    assert code == 2 and "Traceback" not in err
    line = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert len(line) == 1 and "mrope_section [11, 11, 10, 0]" in line[0] and "head_dim 16" in line[0]
    assert not list((tmp_path / "x").glob("*.gguf*"))


@pytest.mark.parametrize("kind", KINDS)
def test_f16_byte_identical_to_llama_cpp_converter(built, kind, tmp_path):
    convert = os.environ.get("QWEN_QUANT_LLAMACPP_CONVERT")
    if not convert:
        pytest.skip("set QWEN_QUANT_LLAMACPP_CONVERT to llama.cpp's convert_hf_to_gguf.py to compare bytes")
    sys.path.insert(0, str(ROOT / "bench"))
    from compare_llamacpp_convert import diff, run_converter

    src, ours = built(kind)
    theirs = tmp_path / "llamacpp-f16.gguf"
    run_converter(Path(convert), src, theirs, "f16", tmp_path, extra=("--no-mtp",))
    assert diff(ours, theirs, set()) == []
    assert ours.read_bytes() == theirs.read_bytes()
