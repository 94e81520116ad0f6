"""Plant seeded faults in copies of artifacts, so tests can show the gate catches what users break.

``plant(src, fault, out, seed)`` copies an artifact (GPTQ / AWQ / compressed-tensors folder, .gguf
file, ONNX folder) to ``out`` and damages the copy in one of these ways, every choice drawn from
``seed`` (no test depends on one particular damaged byte, and a new fault is one function
``_<kind>_<fault>`` here, or in `qwen_quant.faults.gguf` for GGUF files):

============== ============================================================= =====================
fault          what changes                                                  caught as
============== ============================================================= =====================
tokenizer      pairs of common tokens swap ids (GGUF token list, tokenizer.json) metadata (exit 1)
pretokenizer   another pre-tokenizer (GGUF tokenizer.ggml.pre, tokenizer.json) metadata (exit 1)
special_tokens eos id moved to another token (GGUF key, genai_config, configs) metadata (exit 1)
template       another model family's chat template                         metadata (exit 1)
rope           rope theta changed (GGUF key, config.json)                   metadata (exit 1)
eps            rms eps changed                                              metadata (exit 1)
context        context length changed (GGUF key, genai_config, config.json) metadata (exit 1)
numeric        x(1 + 0.05 N(0,1)) on one layer's weight scales (or values)  metrics (exit 1)
truncate       the largest file cut short                                   unusable (exit 2)
config         config contradicts tensors (bits, group size, vocab, tied/    unusable (exit 2)
               lm_head, intermediate size, scales shape; GGUF/genai shapes)
============== ============================================================= =====================
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EXPECT = {"tokenizer": "metadata", "pretokenizer": "metadata", "special_tokens": "metadata", "template": "metadata",
          "rope": "metadata", "eps": "metadata", "context": "metadata", "numeric": "metrics", "truncate": "unusable",
          "config": "unusable"}
FAULTS = tuple(EXPECT)
CONFIG_VARIANTS = {"hf": ("bits", "group_size", "vocab", "lm_head", "intermediate", "scales_shape"),
                   "gguf": ("feed_forward_length", "embedding_length"),
                   "onnx": ("num_hidden_layers", "num_key_value_heads", "head_size")}
# chat templates of other model families (generic shapes of Llama-3's and Zephyr's)
OTHER_TEMPLATES = (
    "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + "
    "'<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '</s>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}",
)
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
OTHER_PRE = ("gpt-2", "llama-bpe", "deepseek-llm", "falcon")


@dataclass
class Fault:
    fault: str
    kind: str  # gguf | onnx | hf
    path: Path  # the damaged copy
    detail: str  # what was done, for test messages
    expect: str  # metadata | metrics | unusable


def artifact_type(src: Path) -> str:
    from qwen_quant.backends import artifact_kind

    return artifact_kind(src)


def plant(src: str | Path, fault: str, out: str | Path, seed: int = 0, variant: str | None = None,
          strength: float = 0.05) -> Fault:
    """Copy ``src`` to ``out`` and plant ``fault`` (see the table above) in the copy."""
    if fault not in EXPECT:
        raise ValueError(f"unknown fault {fault!r}; one of {', '.join(FAULTS)}")
    src, out = Path(src), Path(out)
    kind = artifact_type(src)
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, out) if src.is_dir() else shutil.copyfile(src, out)
    rng = random.Random(f"{fault}:{seed}")
    if fault == "config":
        variant = variant or rng.choice(CONFIG_VARIANTS[kind])
    if kind == "gguf":
        from qwen_quant.faults import gguf as impl
    else:
        import sys

        impl = sys.modules[__name__]
    detail = getattr(impl, f"_{kind}_{fault}")(out, rng, variant=variant, strength=strength)
    return Fault(fault, kind, out, detail, EXPECT[fault])


# ---- shared helpers -----------------------------------------------------------------------------

def _swap_pairs(vocab: dict[str, int] | list[str], rng: random.Random, n: int = 24) -> list[tuple[int, int]]:
    """Pairs of common tokens (ids 256-6000, equal byte length, distinct) to swap."""
    items = list(enumerate(vocab)) if isinstance(vocab, list) else [(i, t) for t, i in vocab.items()]
    by_len: dict[int, list[int]] = {}
    for i, t in items:
        if 256 <= i < 6000 and len(t) >= 3:
            by_len.setdefault(len(t.encode()), []).append(i)
    pairs, used = [], set()
    lengths = sorted(k for k, v in by_len.items() if len(v) >= 2)
    while len(pairs) < n:
        ids = by_len[rng.choice(lengths)]
        a, b = rng.sample(ids, 2)
        if a not in used and b not in used:
            used |= {a, b}
            pairs.append((a, b))
    return pairs


def _json_edit(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d, indent=2, ensure_ascii=False) + "\n")


def _truncate(path: Path, rng: random.Random) -> str:
    size = path.stat().st_size
    keep = int(size * rng.uniform(0.4, 0.95))
    with open(path, "r+b") as fh:
        fh.truncate(keep)
    return f"{path.name} cut from {size} to {keep} bytes"


def _noise(rng: random.Random, shape, strength: float) -> np.ndarray:
    return 1.0 + strength * np.random.default_rng(rng.randrange(2**32)).standard_normal(shape).astype(np.float32)


# ---- Hugging Face checkpoints (GPTQ, AWQ, compressed-tensors) -----------------------------------

def _tok_json(out: Path, fn) -> None:
    _json_edit(out / "tokenizer.json", fn)


def _hf_tokenizer(out, rng, **_) -> str:
    pairs = []

    def swap(d):
        vocab = d["model"]["vocab"]
        inv = {i: t for t, i in vocab.items()}
        pairs.extend(_swap_pairs(vocab, rng))
        for a, b in pairs:
            vocab[inv[a]], vocab[inv[b]] = b, a
    _tok_json(out, swap)
    return f"{len(pairs)} token pairs swapped in tokenizer.json"


def _hf_pretokenizer(out, rng, **_) -> str:
    def pre(d):
        p = d["pre_tokenizer"]
        for sub in p.get("pretokenizers", [p]):
            if sub.get("type") == "Split":
                sub["pattern"] = {"Regex": GPT2_SPLIT}
    _tok_json(out, pre)
    return "tokenizer.json pre-tokenizer regex replaced by GPT-2's"


def _other_id(rng: random.Random) -> int:
    return rng.randrange(1000, 150000)


def _hf_special_tokens(out, rng, **_) -> str:
    new = _other_id(rng)
    for f in ("config.json", "generation_config.json"):
        if (out / f).exists():
            _json_edit(out / f, lambda d: d.__setitem__("eos_token_id", new))
    return f"eos_token_id set to {new}"


def _set_template(folder: Path, tmpl: str) -> None:
    (folder / "chat_template.jinja").write_text(tmpl)
    tc = folder / "tokenizer_config.json"
    if tc.exists():
        _json_edit(tc, lambda d: d.__setitem__("chat_template", tmpl) if "chat_template" in d else None)


def _hf_template(out, rng, **_) -> str:
    _set_template(out, rng.choice(OTHER_TEMPLATES))
    return "chat template replaced by another family's"


def _cfg_number(folder: Path, keys: tuple[str, ...], fn) -> str:
    def edit(d):
        for k in keys:
            rp = d.get("rope_parameters") if k == "rope_theta" else None
            if k in d:
                d[k] = fn(d[k])
            elif rp and k in rp:
                rp[k] = fn(rp[k])
    _json_edit(folder / "config.json", edit)
    return f"{'/'.join(keys)} changed in config.json"


def _hf_rope(out, rng, **_) -> str:
    f = rng.choice((10000.0, 500000.0, 5000000.0))
    return _cfg_number(out, ("rope_theta",), lambda v: f if f != v else f * 2)


def _hf_eps(out, rng, **_) -> str:
    f = rng.choice((1e-5, 1e-12))
    return _cfg_number(out, ("rms_norm_eps",), lambda v: f if f != v else f * 10)


def _hf_context(out, rng, **_) -> str:
    f = rng.choice((0.5, 2, 8))
    return _cfg_number(out, ("max_position_embeddings",), lambda v: int(v * f))


def _hf_tensors(out: Path):
    from safetensors.numpy import load_file

    f = sorted(out.glob("*.safetensors"))[0]
    return f, load_file(str(f))


def _hf_save(f: Path, sd) -> None:
    from safetensors.numpy import save_file

    save_file(sd, str(f), metadata={"format": "pt"})


def _hf_numeric(out, rng, strength=0.05, **_) -> str:
    """Noise on the scales of every quantized linear of one decoder layer (a layer's worth of bad weights)."""
    f, sd = _hf_tensors(out)
    layers = sorted({k.split(".")[2] for k in sd if k.startswith("model.layers.")}, key=int)
    layer = rng.choice(layers)
    names = sorted(k for k in sd if k.startswith(f"model.layers.{layer}.") and k.endswith((".scales", ".weight_scale")))
    if not names:
        names = sorted(k for k in sd if k.startswith(f"model.layers.{layer}.") and k.endswith(".weight") and sd[k].ndim == 2)
    for name in names:
        t = sd[name]
        sd[name] = (t.astype(np.float32) * _noise(rng, t.shape, strength)).astype(t.dtype)
    _hf_save(f, sd)
    return f"layer {layer}: {len(names)} scale tensors x (1 + {strength:g} * N(0, 1))"


def _hf_truncate(out, rng, **_) -> str:
    return _truncate(max(out.glob("*.safetensors"), key=lambda p: p.stat().st_size), rng)


def _hf_config(out, rng, variant=None, **_) -> str:
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg.get("quantization_config") or {}
    w = next(iter((qc.get("config_groups") or {}).values()), {}).get("weights") if qc.get("config_groups") else None
    if variant == "bits":
        if w is not None:
            w["num_bits"] = 8 if w["num_bits"] == 4 else 4
        else:
            qc["bits"] = 8 if qc.get("bits") == 4 else 4
    elif variant == "group_size":
        tgt = w if w is not None else qc
        tgt["group_size"] = 64 if tgt.get("group_size") != 64 else 32
    elif variant == "vocab":
        cfg["vocab_size"] += 128
    elif variant == "intermediate":
        cfg["intermediate_size"] += 64
    elif variant == "lm_head":
        f, sd = _hf_tensors(out)
        for k in [k for k in sd if k.startswith("lm_head.")]:
            del sd[k]
        _hf_save(f, sd)
        cfg["tie_word_embeddings"] = False
    elif variant == "scales_shape":
        f, sd = _hf_tensors(out)
        name = rng.choice(sorted(k for k in sd if k.endswith((".scales", ".weight_scale"))))
        sd[name] = np.ascontiguousarray(sd[name][:, :-1] if sd[name].shape[-1] > 1 else sd[name][:-1])
        _hf_save(f, sd)
        variant = f"scales_shape ({name})"
    else:
        raise ValueError(f"unknown config variant {variant!r}")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return f"config/tensor mismatch: {variant}"


# ---- ONNX folders -------------------------------------------------------------------------------

def _onnx_tokenizer(out, rng, **kw) -> str:
    return _hf_tokenizer(out, rng, **kw)


def _onnx_pretokenizer(out, rng, **kw) -> str:
    return _hf_pretokenizer(out, rng, **kw)


def _onnx_special_tokens(out, rng, **_) -> str:
    new = _other_id(rng)
    _json_edit(out / "genai_config.json", lambda d: d["model"].__setitem__("eos_token_id", new))
    return f"genai_config.json eos_token_id set to {new}"


def _onnx_template(out, rng, **_) -> str:
    _set_template(out, rng.choice(OTHER_TEMPLATES))
    return "chat template replaced by another family's"


def _onnx_rope(out, rng, **kw) -> str:
    return _hf_rope(out, rng, **kw)


def _onnx_eps(out, rng, **kw) -> str:
    return _hf_eps(out, rng, **kw)


def _onnx_context(out, rng, **_) -> str:
    f = rng.choice((0.5, 2, 8))
    _json_edit(out / "genai_config.json", lambda d: d["model"].__setitem__("context_length", int(d["model"]["context_length"] * f)))
    return f"genai_config.json context_length x{f}"


def _onnx_numeric(out, rng, strength=0.05, **_) -> str:
    """Noise on seven weight-scale (or fp weight) initializers: a decoder layer's worth (graph names are anonymous)."""
    import onnx
    from onnx import numpy_helper

    path = out / "model.onnx"
    model = onnx.load(str(path))
    external = any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer)
    floats = [i for i in model.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
              and len(i.dims) == 2 and int(np.prod(i.dims)) >= 256 and "embed" not in i.name]
    scales = [i for i in floats if i.name.endswith("_scales")]
    cands = sorted(scales or floats, key=lambda i: i.name)
    picked = rng.sample(cands, min(7, len(cands)))
    for init in picked:
        arr = numpy_helper.to_array(init)
        init.CopyFrom(numpy_helper.from_array((arr.astype(np.float32) * _noise(rng, arr.shape, strength)).astype(arr.dtype),
                                              init.name))
    if external:
        for f in out.glob("*.data"):
            f.unlink()
        onnx.save(model, str(path), save_as_external_data=True, location="model.onnx.data")
    else:
        onnx.save(model, str(path))
    return f"{len(picked)} initializers x (1 + {strength:g} * N(0, 1))"


def _onnx_truncate(out, rng, **_) -> str:
    files = [f for f in out.iterdir() if f.name == "model.onnx" or f.name.endswith(".data")]
    return _truncate(max(files, key=lambda p: p.stat().st_size), rng)


def _onnx_config(out, rng, variant=None, **_) -> str:
    _json_edit(out / "genai_config.json", lambda d: d["model"]["decoder"].__setitem__(variant, d["model"]["decoder"][variant] + 1))
    return f"config/tensor mismatch: genai_config.json {variant} + 1"
