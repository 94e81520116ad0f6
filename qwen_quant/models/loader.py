"""Find, check and load Qwen checkpoints, offline only.

A model reference is a local folder or a hub id that must already sit in the local Hugging Face
cache (this tool never downloads). Quantized checkpoints we write (GPTQ, AWQ) load through our own
dequantizing loaders in `qwen_quant.formats`, so validation works on a CPU without the GPU kernel
packages; compressed-tensors checkpoints load through transformers itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qwen_quant.devices import torch_device
from qwen_quant.errors import QuantError
from qwen_quant.models.registry import QwenFamily, detect_family

DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
          "bf16": "bfloat16", "bfloat16": "bfloat16"}


def resolve_model(ref: str | Path) -> Path:
    """A local checkpoint folder for ``ref`` (folder path, or hub id found in the local HF cache)."""
    p = Path(ref).expanduser()
    if p.exists():
        if not p.is_dir():
            raise QuantError(f"{p} is a file, not a checkpoint folder; pass the folder that holds config.json")
        if not (p / "config.json").exists():
            raise QuantError(f"{p} has no config.json; pass a Hugging Face checkpoint folder (config.json + *.safetensors)")
        return p
    ref = str(ref)
    looks_like_id = ref.count("/") == 1 and not ref.startswith((".", "/", "~"))
    if not looks_like_id:
        raise QuantError(f"model folder {ref} does not exist; pass an existing checkpoint folder or a cached hub id like Qwen/Qwen2-1.5B")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, local_files_only=True))
    except Exception:
        raise QuantError(f"{ref} is not in the local Hugging Face cache and qwen-quant works offline; "
                         f"download it first (hf download {ref}) or pass a local folder") from None


def load_config(path: str | Path) -> dict[str, Any]:
    path = resolve_model(path)
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise QuantError(f"{path / 'config.json'} is not valid JSON ({err}); fix or re-download the checkpoint") from None


def load_text_config(path: str | Path) -> dict[str, Any]:
    """config.json of the text model: the file itself, or its ``text_config`` in a multimodal checkpoint."""
    cfg = load_config(path)
    try:
        return detect_family(cfg).text(cfg)
    except QuantError:
        return cfg


def hf_text_config(path: str | Path):
    """transformers' config of the model `load_model` builds: the checkpoint's own, or in a
    multimodal checkpoint its text config with the top-level ``tie_word_embeddings`` (transformers 5
    reads the text config's own flag, False by default, and would leave a tied lm_head random)."""
    from transformers import AutoConfig

    raw = load_config(path)
    cfg = AutoConfig.from_pretrained(str(resolve_model(path)))
    try:
        fam = detect_family(raw)
    except QuantError:
        return cfg
    if not fam.text_config_key:
        return cfg
    text = cfg.get_text_config()
    text.tie_word_embeddings = bool(raw.get("tie_word_embeddings", text.tie_word_embeddings))
    if raw.get("quantization_config"):
        text.quantization_config = raw["quantization_config"]
    return text


def check_model(path: str | Path) -> tuple[Path, dict[str, Any], QwenFamily]:
    """Resolve, read config and recognise the family; raises QuantError on anything unusable."""
    p = resolve_model(path)
    cfg = load_config(p)
    fam = detect_family(cfg, p)
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise QuantError(f"{p} has config.json but no weight files (*.safetensors); the download may be incomplete")
    if fam.supported and any(p.glob("*.safetensors")):
        from qwen_quant.formats.integrity import check_checkpoint

        check_checkpoint(p, fam.text(cfg), fam)  # truncated shards, config contradicting tensors: one line, exit 2
    return p, cfg, fam


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    p = resolve_model(path)
    if not (p / "tokenizer.json").exists() and not (p / "vocab.json").exists():
        raise QuantError(f"{p} has no tokenizer files (tokenizer.json); copy the tokenizer of the original model into it")
    return AutoTokenizer.from_pretrained(str(p))


def torch_dtype(name: str | None, device: str = "cpu"):
    import torch

    if name is None:
        name = "float32" if device == "cpu" else "bfloat16"
    if name not in DTYPES:
        raise QuantError(f"unknown dtype {name!r}; use one of fp32, fp16, bf16")
    return getattr(torch, DTYPES[name])


def load_model(path: str | Path, device: str = "cpu", dtype: str | None = "float32"):
    """The model as a torch module in eval mode; quantized checkpoints come back dequantized."""
    p, cfg, _ = check_model(path)
    device = torch_device(device)
    dt = torch_dtype(dtype, device)
    method = (cfg.get("quantization_config") or {}).get("quant_method")
    try:
        model = _load(p, method, dt)
    except (OSError, ValueError, RuntimeError, KeyError) as err:  # damage the header checks cannot see
        first = (str(err).splitlines() or [""])[0][:200]
        raise QuantError(f"{p} could not be loaded ({type(err).__name__}: {first}); the checkpoint is damaged or "
                         "its config does not match its tensors, re-create it") from None
    return model.to(device).eval()


def _load(p: Path, method: str | None, dt):
    from transformers import AutoModelForCausalLM

    from qwen_quant.formats.fp8 import is_fp8

    qc = (json.loads((p / "config.json").read_text()).get("quantization_config") or {}) if method else {}
    if is_fp8(qc):  # FP8 weights with dynamic activation quantization, as the serving kernels compute
        from qwen_quant.formats.fp8 import load_w8a8

        model = load_w8a8(p, dtype=dt)
    elif method in ("gptq", "awq"):
        from qwen_quant.formats import load_dequantized

        model = load_dequantized(p, method, dtype=dt)
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        kw = {}
        if method == "compressed-tensors":
            # dense weights at load: compressed-tensors 0.20 cannot build the packed zero-point
            # placeholders of asymmetric pack-quantized checkpoints, so the compressed path fails
            from transformers import CompressedTensorsConfig

            kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
        model = AutoModelForCausalLM.from_pretrained(str(p), config=hf_text_config(p), dtype=dt, **kw)
    return model
