"""The hybrid linear-attention Qwen families (qwen3_next, qwen3_5, qwen3_5_moe) on tiny random
checkpoints saved by transformers' own classes: the family tables agree with transformers' modules,
info shows the layer mix, GPTQ/RTN run transformers' own Gated DeltaNet layers and write
checkpoints that load back close to the source, the multimodal checkpoint keeps its vision tower
and MTP weights byte for byte and still loads in transformers, and the ONNX exporter, which cannot
take these families, says so in one line (GGUF: test_hybrid_gguf.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hybrid_helpers import KINDS, build
from qwen_quant.models import detect_family
from qwen_quant.models.family import template_of

QUANT = ("--bits", "4", "--group-size", "32", "--nsamples", "4", "--seqlen", "64", "--no-validate", "-q")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("hybrid")
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = build(kind, root / kind, tokenizer_dir, tied=kind != "qwen3_next", mtp=kind == "qwen3_5")
        return made[kind]

    return get


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_family_tables_agree_with_transformers(ckpt, kind):
    """Every linear a group names is an nn.Linear of that layer type with the table's shape; every
    linear of the layer is either quantized or listed as full precision (nothing silently skipped)."""
    from transformers import AutoModelForCausalLM

    path = ckpt(kind)
    raw = json.loads((path / "config.json").read_text())
    fam = detect_family(raw)
    assert fam.name == kind
    cfg = fam.text(raw)
    model = AutoModelForCausalLM.from_pretrained(path)
    shapes = fam.linear_shapes(cfg)
    for i, layer in enumerate(model.model.layers):
        names = [n for g in fam.layer_groups(cfg, i) for n in g]
        mixer = "linear_attn" if fam.layer_type(cfg, i) == "linear_attention" else "self_attn"
        assert names and all(not n.startswith(("linear_attn", "self_attn")) or n.startswith(mixer) for n in names)
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        for n in names:
            if ".experts." in n:  # fused in memory ([E, 2I, H] and [E, H, I]), per expert on disk
                e, proj = int(n.split(".")[2]), n.rsplit(".", 1)[1]
                w = layer.mlp.experts.down_proj[e] if proj == "down_proj" else \
                    layer.mlp.experts.gate_up_proj[e].chunk(2)[0 if proj == "gate_proj" else 1]
                assert tuple(w.shape[::-1]) == shapes[template_of(n)], n
                continue
            assert n in linears, (kind, i, n)
            assert (linears[n].in_features, linears[n].out_features) == shapes[template_of(n)], n
        kept = {n for n in linears if n not in names}
        assert kept <= set(fam.full_precision), (kind, i, kept)
    assert fam.layer_mix(cfg) == {"linear_attention": 3, "full_attention": 1}


@pytest.mark.parametrize("kind", KINDS)
def test_info_shows_the_layer_mix(run_cli, ckpt, kind):
    code, out, err = run_cli("info", ckpt(kind), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["family"] == kind and info["layer_mix"] == {"linear_attention": 3, "full_attention": 1}
    assert "layers: 3 linear attention + 1 full attention" in info["quirks"]
    assert "linear_attn.in_proj_b" in info["full_precision"] or "linear_attn.in_proj_ba" in info["full_precision"]


def _logits(path, ids):
    from qwen_quant.models.loader import load_model

    with torch.no_grad():
        return load_model(path)(ids).logits.float()


@pytest.mark.parametrize("kind,method", [("qwen3_5_text", "gptq"), ("qwen3_next", "gptq"), ("qwen3_5_text", "rtn"),
                                         ("qwen3_5_text", "awq")])
def test_quantized_hybrid_loads_back_close(run_cli, ckpt, tmp_path, kind, method):
    src, out = ckpt(kind), tmp_path / method
    code, _, err = run_cli("awq" if method == "awq" else "gptq", src, "-o", out, *QUANT,
                           *(["--rtn"] if method == "rtn" else []))
    assert code == 0, err
    t = _tensors(out)
    fam = detect_family(json.loads((src / "config.json").read_text()))
    first = fam.linear_groups[0][0]
    assert f"model.layers.0.{first}.qweight" in t and f"model.layers.3.self_attn.q_proj.qweight" in t
    for n in fam.full_precision:
        if n.startswith("linear_attn"):
            assert f"model.layers.0.{n}.weight" in t and f"model.layers.0.{n}.qweight" not in t
    assert t["model.layers.0.linear_attn.A_log"].dtype == torch.float16  # written in the output dtype, unquantized
    ids = torch.randint(0, 5000, (2, 48), generator=torch.Generator().manual_seed(0))
    a, b = _logits(src, ids), _logits(out, ids)
    kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    assert 0 < float((a - b).abs().max()) < 0.5  # quantized (not a copy) yet close
    assert float(kl.mean()) < 1e-3


def test_multimodal_checkpoint_keeps_vision_and_mtp_byte_identical(run_cli, ckpt, tmp_path):
    """gptq on a Qwen3.5 ConditionalGeneration checkpoint: every tensor outside the text model is
    copied byte for byte (vision tower, mtp.*), and the compressed-tensors output loads in transformers."""
    from transformers import AutoModelForImageTextToText, CompressedTensorsConfig

    src = ckpt("qwen3_5")
    for fmt in ("gptq", "compressed-tensors"):
        out = tmp_path / fmt
        code, _, err = run_cli("gptq", src, "-o", out, "--format", fmt, *QUANT)
        assert code == 0, err
        a, b = _tensors(src), _tensors(out)
        rest = [k for k in a if not k.startswith(("model.language_model.", "lm_head."))]
        assert any(k.startswith("model.visual.") for k in rest) and any(k.startswith("mtp.") for k in rest)
        for k in rest:
            assert b[k].dtype == a[k].dtype and torch.equal(b[k].view(torch.uint8), a[k].view(torch.uint8)), k
        assert "model.language_model.layers.0.linear_attn.in_proj_qkv.qweight" in b or \
               "model.language_model.layers.0.linear_attn.in_proj_qkv.weight_packed" in b
    ref = AutoModelForImageTextToText.from_pretrained(src)
    got = AutoModelForImageTextToText.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    sa, sb = ref.state_dict(), got.state_dict()
    vision = [k for k in sa if k.startswith("model.visual.")]
    assert vision and all(torch.equal(sa[k], sb[k]) for k in vision)
    ids = torch.randint(0, 5000, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        d = (ref(ids).logits - got(ids).logits).abs().max()
    assert 0 < float(d) < 0.5
    # our own loader reads the same output's text model
    assert float((_logits(out, ids) - _logits(src, ids)).abs().max()) < 0.5


def test_eval_of_quantized_multimodal_checkpoint(run_cli, ckpt, tmp_path):
    src, out = ckpt("qwen3_5"), tmp_path / "q"
    assert run_cli("gptq", src, "-o", out, *QUANT)[0] == 0
    code, _, err = run_cli("eval", out, "--reference", src, "--ctx", "32", "--max-tokens", "128", "--greedy-tokens", "2",
                           "--device", "cpu", "--json", tmp_path / "r.json", "-q")
    assert code == 0, err
    m = json.loads((tmp_path / "r.json").read_text())["results"][0]["metrics"]
    assert m["kl_mean"] < 1e-3 and 0.9 < m["ppl_ratio"] < 1.1


def test_experts_refused_in_one_line_without_expert_support(run_cli, ckpt, tmp_path):
    try:
        import qwen_quant.quantize.moe  # noqa: F401
        pytest.skip("this version quantizes experts")
    except ImportError:
        pass
    code, out, err = run_cli("gptq", ckpt("qwen3_5_moe_text"), "-o", tmp_path / "o", *QUANT)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1 and "experts" in err


def test_onnx_export_refuses_in_one_line(run_cli, ckpt, tmp_path):
    """(GGUF export of these families: tests/test_hybrid_gguf.py.)"""
    code, out, err = run_cli("export", "onnx", ckpt("qwen3_5_text"), "-o", tmp_path / "x")
    assert code == 2 and "Traceback" not in err
    line = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert len(line) == 1 and "Gated DeltaNet" in line[0]
