"""The family files: architecture knowledge lives only in qwen_quant/models/, and each family's
table agrees with the transformers model it describes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from qwen_quant.models import FAMILIES, detect_family, model_info
from qwen_quant.models.family import template_of

PKG = Path(__file__).resolve().parents[1] / "qwen_quant"


def _arch_names() -> set[str]:
    names = set()
    for fam in FAMILIES:
        names |= set(fam.model_types) | set(fam.architectures) | {fam.name}
        if fam.onnx_type:
            names.add(fam.onnx_type)
    return names - {""}


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _violations(source: str) -> list[tuple[int, str]]:
    names = _arch_names()
    archs = {a for f in FAMILIES for a in f.architectures}
    tree = ast.parse(source)
    docs = _docstrings(tree)
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if node.value in names:
                bad.append((node.lineno, repr(node.value)))
        elif isinstance(node, ast.Attribute) and (getattr(node.value, "id", None) == "MODEL_ARCH"
                                                  or getattr(node.value, "attr", None) == "MODEL_ARCH"):
            bad.append((node.lineno, f"MODEL_ARCH.{node.attr}"))
        elif isinstance(node, (ast.Name, ast.alias)):
            ident = node.id if isinstance(node, ast.Name) else node.name
            if ident in archs or ident.replace("Config", "ForCausalLM") in archs:
                bad.append((node.lineno, ident))
    return bad


def test_no_architecture_names_outside_models():
    """No module outside qwen_quant/models/ names an architecture: not as a string ("qwen2",
    "Qwen3ForCausalLM"), not as gguf-py's MODEL_ARCH member, not as a transformers class."""
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if rel.parts[0] != "models":
            bad += [f"{rel}:{line}: {what}" for line, what in _violations(path.read_text())]
    assert not bad, "architecture names outside qwen_quant/models/:\n" + "\n".join(bad)


def test_the_checker_sees_planted_names():
    """The check above can fail: it finds a "qwen2" literal, MODEL_ARCH.QWEN2 and a transformers class."""
    src = 'import gguf\nfrom transformers import Qwen2ForCausalLM\nx = "qwen2"\ny = gguf.MODEL_ARCH.QWEN2\n"""doc"""\n'
    found = {what for _, what in _violations(src)}
    assert found == {"'qwen2'", "MODEL_ARCH.QWEN2", "Qwen2ForCausalLM"}


def _tiny_config(model_type: str) -> dict:
    from transformers import AutoConfig

    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=512)
    if model_type == "qwen3":
        kw["head_dim"] = 32  # explicit, not hidden/heads, as on every real Qwen3
    return AutoConfig.for_model(model_type, **kw).to_dict()


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_family_tables_match_transformers_modules(model_type):
    """Every linear the family lists exists in transformers' own decoder layer with the shape the
    family computes from config.json, and nothing quantizable is left out."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = _tiny_config(model_type)
    fam = detect_family(cfg)
    assert fam.supported and model_type in fam.model_types
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{k: v for k, v in cfg.items()
                                                                                       if k != "model_type"}))
    layer = model.get_submodule(f"{fam.layers_path}.0")
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    listed = [n for g in fam.layer_groups(cfg, 0) for n in g]
    assert sorted(listed) == sorted(linears)
    shapes = fam.linear_shapes(cfg)
    for n in listed:
        assert shapes[template_of(n)] == (linears[n].in_features, linears[n].out_features), n
    assert model.get_submodule(fam.rotary_path) is not None and model.get_submodule(fam.embed_path) is not None
    assert (linears["self_attn.q_proj"].bias is not None) == fam.qkv_bias
    assert hasattr(layer.self_attn, "q_norm") == fam.qk_norm
    for pair in fam.scale_pairs:
        layer.get_submodule(pair.prev)
        for n in pair.linears:
            assert n in linears
    info = model_info(cfg)
    real = sum(p.numel() for p in model.parameters()) - (model.config.tie_word_embeddings and 0)
    assert abs(info.params - real) / real < 0.01, (info.params, real)
