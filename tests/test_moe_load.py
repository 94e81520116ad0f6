"""GPTQ checkpoints of the trained Mixture-of-Experts fixtures: what stays in full precision, and that
transformers loads them with our greedy output.

Which modules Qwen's GPTQ MoE releases quantize is fixed by the tool that made them (AutoGPTQ's
``Qwen2MoeGPTQForCausalLM`` / GPTQModel's ``Qwen2MoeGPTQ`` and ``Qwen3MoeGPTQ`` module lists): q/k/v/o,
the shared expert's gate/up/down and every expert's gate/up/down. The router ``mlp.gate`` and the
shared-expert gate ``mlp.shared_expert_gate`` are not in those lists, so they are plain float tensors in
the releases; ours must match, and the configs must say so (``modules_to_not_convert`` for classic
GPTQ, the compressed-tensors ``ignore`` list, which transformers' loader reads to leave them dense).

transformers loads classic GPTQ only through the gptqmodel kernels package, which is not part of this
stack; the classic checkpoint is read by our loader, the compressed-tensors one by plain
``from_pretrained`` (its own decompressor), and both decode the same greedy tokens.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from qwen_quant.calib import CalibConfig
from qwen_quant.quantize import config_for, quantize_model

#: (family, fixture, what Qwen's GPTQ releases quantize in a sparse layer beyond attention)
CASES = {"qwen2_moe": ("qwen2-moe-tiny", ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
                                          "mlp.shared_expert.down_proj")),
         "qwen3_moe": ("qwen3-moe-tiny", ())}
ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
FULL_PRECISION = {"qwen2_moe": ["mlp.gate", "mlp.shared_expert_gate"], "qwen3_moe": ["mlp.gate"]}


def _fixture(name):
    from qwen_quant.fixtures import fixture_path
    from qwen_quant.progress import set_quiet

    set_quiet(True)
    return fixture_path(name)


@pytest.fixture(scope="module", params=list(CASES))
def quantized(request, tmp_path_factory):
    """family -> (source, classic GPTQ, compressed-tensors GPTQ) of the trained fixture."""
    src = _fixture(CASES[request.param][0])
    root = tmp_path_factory.mktemp(request.param)
    outs = []
    for fmt in ("gptq", "compressed-tensors"):
        cfg = config_for("gptq", model=str(src), output=str(root / fmt), bits=4, group_size=128, format=fmt,
                         calib=CalibConfig("shipped", 8, 128, 0), device="cpu", force=True, validate=False)
        outs.append(quantize_model(cfg)[0])
    return request.param, src, *outs


def _expected_quantized(cfg: dict, extra: tuple[str, ...]) -> set[str]:
    from qwen_quant.models import detect_family

    fam = detect_family(cfg)
    out = set()
    for i in range(cfg["num_hidden_layers"]):
        sparse = fam.moe.sparse(cfg, i)
        mlp = [f"mlp.experts.{e}.{p}" for e in range(fam.moe.num_experts(cfg))
               for p in ("gate_proj", "up_proj", "down_proj")] + list(extra) if sparse else \
            ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
        out |= {f"model.layers.{i}.{n}" for n in (*ATTENTION, *mlp)}
    return out


def _names(path) -> dict:
    from safetensors import safe_open

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_slice(k).get_dtype() for k in st.keys()})
    return out


def test_full_precision_modules_match_qwens_gptq_releases(quantized):
    family, src, classic, ct = quantized
    cfg = json.loads((src / "config.json").read_text())
    want = _expected_quantized(cfg, CASES[family][1])
    if family == "qwen2_moe":
        assert "model.layers.0.mlp.gate_proj" in want  # the fixture's dense layer (mlp_only_layers)
    for path, suffix in ((classic, ".qweight"), (ct, ".weight_packed")):
        names = _names(path)
        got = {n[: -len(suffix)] for n in names if n.endswith(suffix)}
        assert got == want, sorted(got ^ want)[:6]
        for i in range(cfg["num_hidden_layers"]):
            if family == "qwen2_moe" and i == 0:
                continue
            for m in FULL_PRECISION[family]:
                assert names[f"model.layers.{i}.{m}.weight"] in ("F16", "F32"), (path.name, m)
    qc = json.loads((classic / "config.json").read_text())["quantization_config"]
    assert qc["modules_to_not_convert"] == ["lm_head", *FULL_PRECISION[family]]
    ignore = json.loads((ct / "config.json").read_text())["quantization_config"]["ignore"]
    assert "lm_head" in ignore
    layer_modules = {n.rsplit(".", 1)[0] for n in _names(src) if n.startswith("model.layers.")}
    ignored = {m for m in layer_modules if any(p.startswith("re:") and re.match(p[3:], m) for p in ignore)}
    assert {m.split(".", 3)[3] for m in ignored} == set(FULL_PRECISION[family])  # nothing else is left dense
    assert not ignored & want


def _greedy(model, prompts, n=16) -> list[list[int]]:
    with torch.inference_mode():
        return [model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False)[0, len(p):].tolist()
                for p in prompts]


def test_transformers_loads_them_with_our_greedy_output(quantized):
    from transformers import AutoModelForCausalLM

    from qwen_quant.calib import greedy_prompts
    from qwen_quant.models import load_tokenizer
    from qwen_quant.models.loader import load_model

    family, src, classic, ct = quantized
    prompts = [ids[-48:] for _, ids in greedy_prompts(load_tokenizer(src))[:4]]
    ours = _greedy(load_model(classic), prompts)
    plain = AutoModelForCausalLM.from_pretrained(str(ct), dtype=torch.float32).eval()
    assert type(plain).__name__ == json.loads((src / "config.json").read_text())["architectures"][0]
    assert plain.model.layers[1].mlp.gate.weight.dtype == torch.float32  # the router stayed a dense linear
    theirs = _greedy(plain, prompts)
    assert theirs == _greedy(load_model(ct), prompts)
    assert theirs == ours, (theirs, ours)
    reference = _greedy(load_model(src), prompts)
    assert sum(a == b for r, o in zip(reference, ours) for a, b in zip(r, o)) > 0.5 * 16 * len(prompts)
