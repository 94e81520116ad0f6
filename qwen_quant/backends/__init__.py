"""Validation backends behind one interface (`Backend`), and `open_backend` that picks one for an artifact."""

from __future__ import annotations

from pathlib import Path

from qwen_quant.backends.base import Backend
from qwen_quant.errors import QuantError

BACKENDS = ("torch", "llama.cpp", "onnxruntime", "vllm")
#: backends that can load each artifact kind besides its natural one (HF checkpoints: vLLM, in its own venv)
ALSO = {"hf": ("vllm",)}


def artifact_kind(artifact: str | Path) -> str:
    """'gguf', 'onnx' or 'hf' (a Hugging Face checkpoint folder, quantized or not)."""
    p = Path(artifact)
    if p.suffix == ".gguf":
        return "gguf"
    if p.suffix == ".onnx" or (p.is_dir() and (p / "model.onnx").exists()):
        return "onnx"
    return "hf"


def default_backend(artifact: str | Path) -> str:
    return {"gguf": "llama.cpp", "onnx": "onnxruntime", "hf": "torch"}[artifact_kind(artifact)]


def open_backend(artifact, backend: str | None = None, device: str = "auto", dtype: str | None = None) -> Backend:
    """Load ``artifact`` on ``backend`` (default: the natural runtime of its format)."""
    if not isinstance(artifact, (str, Path)):  # an in-memory torch model
        from qwen_quant.backends.torch_backend import TorchBackend

        return TorchBackend(artifact, device=device, dtype=dtype)
    p = Path(artifact)
    if not p.exists():
        from qwen_quant.models.loader import resolve_model

        p = resolve_model(artifact)  # hub id from the local cache, or a clear error
    backend = backend or default_backend(p)
    kind = artifact_kind(p)
    if kind == "gguf" and not p.is_file():
        raise QuantError(f"{p} is not a file; pass a .gguf file")
    wanted = {"gguf": "llama.cpp", "onnx": "onnxruntime", "hf": "torch"}[kind]
    if backend != wanted and backend not in ALSO.get(kind, ()):
        raise QuantError(f"backend {backend!r} cannot load a {kind} artifact ({p}); use --backend "
                         + " or ".join((wanted, *ALSO.get(kind, ()))))
    if backend == "torch":
        from qwen_quant.backends.torch_backend import TorchBackend

        return TorchBackend(p, device=device, dtype=dtype)
    if backend == "llama.cpp":
        from qwen_quant.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend(p, device=device)
    if backend == "vllm":
        from qwen_quant.backends.vllm_engine import VllmBackend

        return VllmBackend(p, device=device, dtype=dtype)
    if backend == "onnxruntime":
        from qwen_quant.backends.onnxrt import OrtBackend

        return OrtBackend(p, device=device)
    raise QuantError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Backend", "artifact_kind", "default_backend", "open_backend"]
