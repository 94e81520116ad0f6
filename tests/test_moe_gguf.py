"""GGUF export of qwen3, qwen2_moe and qwen3_moe (qwen_quant/export/gguf.py and the family files) on
llama.cpp, on tiny random checkpoints saved by transformers' own classes with the real Qwen tokenizer.

Byte identity with llama.cpp's converter and quantizer needs their programs, which are not shipped:
set QWEN_QUANT_LLAMACPP_CONVERT to a convert_hf_to_gguf.py and QWEN_QUANT_LLAMA_QUANTIZE to a
llama-quantize binary to run those tests (they skip, saying so, otherwise).
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from gguf_helpers import gguf_logits, mean_kl  # noqa: E402
from moe_helpers import BASE, CONFIGS, FAMILIES, IDS, save_tiny  # noqa: E402

from qwen_quant.errors import QuantError  # noqa: E402
from qwen_quant.models.families import qwen2_moe, qwen3_moe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """family name -> (checkpoint, its F16 GGUF), built once per module."""
    from qwen_quant.export.gguf import write_float_gguf

    root = tmp_path_factory.mktemp("moe-gguf")

    @lru_cache(maxsize=None)
    def get(name: str) -> tuple[Path, Path]:
        fam = next(f for f in FAMILIES if f.name == name)
        src = save_tiny(fam, root / name)
        return src, write_float_gguf(src, root / f"{name}-f16.gguf", "f16")

    return get


def _torch_logits(src: Path, ids: np.ndarray) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(input_ids=torch.as_tensor(ids)).logits.float().numpy()


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_tensors_and_keys_are_llama_cpps(built, family):
    """Stacked experts [experts, out, in] in numpy order, shared-expert tensors, F32 router and gate, the keys."""
    import gguf
    from safetensors import safe_open

    src, path = built(family.name)
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    assert arch == gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, family.gguf.arch)]
    t = {x.name: x for x in reader.tensors}
    field = lambda key: reader.fields[f"{arch}.{key}"].contents()  # noqa: E731
    if family.qk_norm:
        assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= set(t)
        assert field("attention.key_length") == 32
    if family.moe is None:
        assert "blk.0.ffn_gate.weight" in t and not any("exps" in n for n in t)
        return
    cfg = {**BASE, **CONFIGS[family.name]}
    e, h, i = cfg["num_experts"], cfg["hidden_size"], cfg["moe_intermediate_size"]
    assert field("expert_count") == e and field("expert_used_count") == cfg["num_experts_per_tok"]
    assert field("expert_feed_forward_length") == i
    for name, shape in (("ffn_gate_exps", [h, i, e]), ("ffn_up_exps", [h, i, e]), ("ffn_down_exps", [i, h, e])):
        assert [int(n) for n in t[f"blk.1.{name}.weight"].shape] == shape, name  # GGML order: in, out, expert
    assert t["blk.0.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert not any(n.startswith("blk.0.ffn_gate.") for n in t)
    with safe_open(str(src / "model.safetensors"), "pt") as f:  # expert 2's down_proj is slice 2 of the stack
        want = f.get_tensor("model.layers.1.mlp.experts.2.down_proj.weight").half().numpy()
    got = np.asarray(t["blk.1.ffn_down_exps.weight"].data).reshape(e, h, i)[2]
    np.testing.assert_array_equal(got, want)
    if family.moe.shared_expert:
        assert field("expert_shared_feed_forward_length") == cfg["shared_expert_intermediate_size"]
        assert {"blk.0.ffn_gate_shexp.weight", "blk.0.ffn_up_shexp.weight", "blk.0.ffn_down_shexp.weight"} <= set(t)
        assert t["blk.0.ffn_gate_inp_shexp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    else:
        assert f"{arch}.expert_shared_feed_forward_length" not in reader.fields
        assert not any("shexp" in n for n in t)


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_runs_on_llama_cpp_close_to_torch(built, family, tmp_path):
    """f16 matches torch fp32; q8_0 stays close; q4_k_m loads and runs (KL printed)."""
    from gguf_helpers import eval_ids

    from qwen_quant.export.gguf_quant import quantize_gguf

    src, f16 = built(family.name)
    ids = eval_ids(1, 64)
    ref = _torch_logits(src, ids)
    kl = {"f16": mean_kl(ref, gguf_logits(f16, rows=1, seq=64))}
    for t in ("q8_0", "q4_k_m"):
        out = quantize_gguf(f16, tmp_path / f"{t}.gguf", t)
        got = gguf_logits(out, rows=1, seq=64)
        assert np.isfinite(got).all()
        kl[t] = mean_kl(ref, got)
    print(f"{family.name} KL vs torch fp32: " + ", ".join(f"{k} {v:.2e}" for k, v in kl.items()))
    assert kl["f16"] < 1e-4 and kl["q8_0"] < 1e-3
    assert kl["q4_k_m"] > kl["q8_0"]


def test_dense_layers_refused_in_one_line(tmp_path):
    """llama.cpp's MoE architectures have experts in every layer: mlp_only_layers cannot be written."""
    from qwen_quant.export.gguf import write_float_gguf

    src = save_tiny(qwen2_moe.FAMILY, tmp_path / "m", mlp_only_layers=[1])
    with pytest.raises(QuantError, match=r"decoder layers \[1\] have no experts.*transformers or vLLM"):
        write_float_gguf(src, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("family", [qwen2_moe.FAMILY, qwen3_moe.FAMILY], ids=lambda f: f.name)
def test_onnx_refuses_moe_in_one_line(run_cli, capsys, tmp_path, family):
    src = save_tiny(family, tmp_path / "m")
    capsys.readouterr()  # transformers' save progress is not the command's output
    code, _, err = run_cli("export", "onnx", src, "-o", tmp_path / "onnx", "--no-validate", "-q")
    assert code == 2
    assert "onnxruntime-genai" in err and "GGUF" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "onnx").exists()


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_f16_byte_identical_to_llama_cpp_converter(built, family, tmp_path):
    convert = os.environ.get("QWEN_QUANT_LLAMACPP_CONVERT")
    if not convert:
        pytest.skip("set QWEN_QUANT_LLAMACPP_CONVERT to llama.cpp's convert_hf_to_gguf.py to compare bytes")
    sys.path.insert(0, str(ROOT / "bench"))
    from compare_llamacpp_convert import diff, run_converter

    src, ours = built(family.name)
    theirs = tmp_path / "llamacpp-f16.gguf"
    run_converter(Path(convert), src, theirs, "f16", tmp_path)
    assert diff(ours, theirs, set()) == []
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
@pytest.mark.parametrize("qtype", ["q4_k_m", "q6_k"])
def test_k_quants_byte_identical_to_llama_quantize(built, family, qtype, tmp_path):
    binary = os.environ.get("QWEN_QUANT_LLAMA_QUANTIZE")
    if not binary:
        pytest.skip("set QWEN_QUANT_LLAMA_QUANTIZE to a llama-quantize binary to compare bytes")
    from qwen_quant.export.gguf_quant import quantize_gguf

    _, f16 = built(family.name)
    ours = quantize_gguf(f16, tmp_path / "ours.gguf", qtype)
    theirs = tmp_path / "theirs.gguf"
    subprocess.run([binary, str(f16), str(theirs), qtype.upper()], check=True, capture_output=True)
    assert ours.read_bytes() == theirs.read_bytes()


def test_quantizer_is_deterministic_on_experts(built, tmp_path):
    """Two runs of the quantizer on the MoE F16 give the same bytes (what makes the identity test meaningful)."""
    from qwen_quant.export.gguf_quant import quantize_gguf

    _, f16 = built(qwen3_moe.FAMILY.name)
    a = quantize_gguf(f16, tmp_path / "a.gguf", "q4_k_m", nthread=1)
    b = quantize_gguf(f16, tmp_path / "b.gguf", "q4_k_m", nthread=2)
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("family", [qwen2_moe.FAMILY, qwen3_moe.FAMILY], ids=lambda f: f.name)
def test_imatrix_covers_experts_as_llama_cpp_names_them(built, family, tmp_path):
    """One row of column statistics per expert (n_expert * n_in values), counted over routed tokens only;
    llama.cpp's quantizer takes them (it refuses sizes that do not fit) and the bytes change."""
    import torch
    from transformers import AutoModelForCausalLM

    from qwen_quant.export.gguf_imatrix import compute_imatrix
    from qwen_quant.export.gguf_quant import quantize_gguf

    src, f16 = built(family.name)
    cfg = {**BASE, **CONFIGS[family.name]}
    e, h, i, k = cfg["num_experts"], cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts_per_tok"]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    samples = [list(range(1000, 1064)), list(range(2000, 2064))]
    stats = compute_imatrix(model, samples)
    values = stats.values()
    for layer in range(cfg["num_hidden_layers"]):
        for name, n_in in (("ffn_gate_exps", h), ("ffn_up_exps", h), ("ffn_down_exps", i)):
            key = f"blk.{layer}.{name}.weight"
            assert values[key].shape == (e * n_in,), key
            assert stats.counts[key].sum() == 128 * k  # every token counted once for each expert it was routed to
    if family.moe.shared_expert:
        assert values["blk.0.ffn_down_shexp.weight"].shape == (cfg["shared_expert_intermediate_size"],)
    plain = quantize_gguf(f16, tmp_path / "plain.gguf", "q4_k_m")
    weighted = quantize_gguf(f16, tmp_path / "imat.gguf", "q4_k_m", imatrix=values)
    assert plain.read_bytes() != weighted.read_bytes()
    assert np.isfinite(gguf_logits(weighted, rows=1, seq=32)).all()


def test_metadata_parity_covers_expert_keys_and_fails_on_a_planted_edit(built, tmp_path):
    import shutil
    import struct

    from qwen_quant.formats.integrity import GGUFIndex
    from qwen_quant.validate.metadata import metadata_parity

    src, f16 = built(qwen3_moe.FAMILY.name)
    good = metadata_parity(f16, src)
    checks = {c["name"]: c for c in good["checks"]}
    for key in ("expert_count", "expert_used_count", "expert_ff_length", "head_dim", "qk_norm"):
        assert checks[key]["ok"], checks[key]
    assert good["ok"], [c for c in good["checks"] if not c["ok"]]

    bad = tmp_path / "planted.gguf"
    shutil.copy(f16, bad)
    idx = GGUFIndex(bad)
    arch = idx.get("general.architecture")
    _, value, start, end = idx.kv[f"{arch}.expert_used_count"]
    idx.close()
    assert value == 2 and end - start == 4
    with open(bad, "r+b") as f:  # top-2 -> top-3: a file that would run another model
        f.seek(start)
        f.write(struct.pack("<I", 3))
    res = metadata_parity(bad, src)
    failed = [c for c in res["checks"] if not c["ok"]]
    assert not res["ok"] and [c["name"] for c in failed] == ["expert_used_count"]
    assert "expert_used_count is 3" in failed[0]["reason"]


def _plant_u32(src: Path, dst: Path, key: str, value: int) -> None:
    import shutil
    import struct

    from qwen_quant.formats.integrity import GGUFIndex

    shutil.copy(src, dst)
    idx = GGUFIndex(dst)
    _, _, start, end = idx.kv[f"{idx.get('general.architecture')}.{key}"]
    idx.close()
    assert end - start == 4
    with open(dst, "r+b") as f:
        f.seek(start)
        f.write(struct.pack("<I", value))


def _rename_tensors(src: Path, dst: Path, old: bytes, new: bytes) -> None:
    """Rename every tensor ``*old*`` to ``*new*`` in the header (same length, so offsets hold)."""
    data = src.read_bytes()
    assert len(old) == len(new) and data.count(old) >= 2
    dst.write_bytes(data.replace(old, new))


def _failed(res: dict) -> list[str]:
    return [c["name"] for c in res["checks"] if not c["ok"]]


def test_metadata_parity_covers_the_shared_expert_and_head_width(built, tmp_path):
    """qwen2_moe: the shared expert's width and presence (its tensors), and the head width llama.cpp
    derives (hidden / heads: the config has no head_dim), each pass on the export and fail alone when planted."""
    from qwen_quant.validate.metadata import metadata_parity

    src, f16 = built(qwen2_moe.FAMILY.name)
    good = metadata_parity(f16, src)
    checks = {c["name"]: c for c in good["checks"]}
    assert checks["expert_shared_ff_length"]["actual"] == 48 and checks["shared_expert"]["actual"] is True
    assert checks["head_dim"]["expected"] == 16 and checks["head_dim"]["ok"] and not checks["qk_norm"]["expected"]
    assert good["ok"], _failed(good)

    _plant_u32(f16, tmp_path / "width.gguf", "expert_shared_feed_forward_length", 64)
    assert _failed(metadata_parity(tmp_path / "width.gguf", src)) == ["expert_shared_ff_length"]
    _plant_u32(f16, tmp_path / "heads.gguf", "attention.head_count", 2)  # hidden / heads: 32 per head
    assert "head_dim" in _failed(metadata_parity(tmp_path / "heads.gguf", src))
    _rename_tensors(f16, tmp_path / "shexp.gguf", b"ffn_up_shexp", b"ffn_up_shexq")
    res = metadata_parity(tmp_path / "shexp.gguf", src)
    assert _failed(res) == ["shared_expert"]
    assert "shared_expert is False" in next(c for c in res["checks"] if not c["ok"])["reason"]


def test_metadata_parity_fails_on_missing_qk_norms(built, tmp_path):
    """qwen3_moe without its q/k norm tensors (renamed away): llama.cpp would run attention unnormed."""
    from qwen_quant.validate.metadata import metadata_parity

    src, f16 = built(qwen3_moe.FAMILY.name)
    _rename_tensors(f16, tmp_path / "noqk.gguf", b"attn_q_norm", b"attn_q_nurm")
    res = metadata_parity(tmp_path / "noqk.gguf", src)
    assert _failed(res) == ["qk_norm"]
    _plant_u32(f16, tmp_path / "noshared.gguf", "expert_count", 8)
    assert _failed(metadata_parity(tmp_path / "noshared.gguf", src)) == ["expert_count"]
