"""Checkpoint formats: packers, their unpackers, and dense loading of quantized checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch


def load_dequantized(model_dir: str | Path, method: str, dtype: torch.dtype = torch.float32):
    """A dense transformers model rebuilt from a GPTQ or AWQ checkpoint (our own unpackers).

    Used by validation so an artifact is measured as written, on CPU, with no GPU kernel package.
    """
    import json

    from transformers import AutoModelForCausalLM

    from qwen_quant.formats.checkpoint import WeightStore

    model_dir = Path(model_dir)
    raw = json.loads((model_dir / "config.json").read_text())
    qc = raw["quantization_config"]
    from qwen_quant.models.loader import hf_text_config

    cfg = hf_text_config(model_dir)  # a multimodal checkpoint: its text model
    cfg.quantization_config = None
    del cfg.quantization_config
    if method == "gptq":
        from qwen_quant.formats.gptq import dequantize
    else:
        from qwen_quant.formats.awq import dequantize
    store = WeightStore(model_dir)
    sd = {}
    for name in store.where:
        if name.endswith((".qweight",)):
            base = name[: -len(".qweight")]
            parts = {k: store.get(k) for k in store.names(base + ".")}
            sd[f"{base}.weight"] = dequantize(parts, base, qc["bits"]).to(dtype)
        elif not name.endswith((".qzeros", ".scales", ".g_idx")):
            sd[name] = store.get(name).to(dtype)
    from qwen_quant.models.registry import detect_family
    from qwen_quant.quantize.moe import fuse_experts

    fam = detect_family(raw)
    sd = fuse_experts(sd, fam, raw)  # per-expert on disk, fused in transformers 5's modules
    with torch.device("meta"):  # a multimodal checkpoint gives its text model (the vision tower is not read)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    sd = {fam.module_path(k): v for k, v in sd.items()}
    keys = set(model.state_dict())
    sd = {k: v for k, v in sd.items() if k in keys}
    missing = set(model.state_dict()) - set(sd)
    if model.config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise RuntimeError(f"{model_dir}: tensors missing after unpacking: {sorted(missing)[:5]}")
    model.load_state_dict(sd, strict=False, assign=True)
    parent, _, attr = fam.module_path(fam.rotary_path).rpartition(".")
    owner = model.get_submodule(parent)
    setattr(owner, attr, type(getattr(owner, attr))(config=model.config))  # non-persistent buffers, not in the file
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
