"""One parser for ``--device``, and what each runtime makes of it.

Every command takes the same spellings: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, or a GPU list
``cuda:0,1`` (also ``cuda:0,cuda:1`` or ``0,1``) that torch splits a model over and vLLM runs tensor
parallel on. `parse` reads the string once; the functions below it turn the result into a torch
device (or list), a vLLM placement, or onnxruntime execution providers.
"""

from __future__ import annotations

from qwen_quant.errors import QuantError

SPELLINGS = "auto, cpu, cuda, cuda:N or cuda:0,1,..."


def parse(device: str | None) -> tuple[str, list[int]]:
    """``(kind, gpu indices)``: "auto"/None -> ("auto", []), "cuda" -> ("cuda", []), "cuda:0,1" -> ("cuda", [0, 1])."""
    d = "auto" if device is None else str(device).strip()
    if d in ("auto", "cpu", "cuda"):
        return d, []
    parts = [p.strip() for p in d.removeprefix("cuda:").split(",") if p.strip()]
    gpus = [p.removeprefix("cuda:") for p in parts]
    if not gpus or not (d.startswith("cuda:") or parts[0].isdigit()) or not all(g.isdigit() for g in gpus):
        raise QuantError(f"--device {device!r} is not a device; use {SPELLINGS}")
    return "cuda", [int(g) for g in gpus]


def _check_cuda(device: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise QuantError(f"--device {device} asked for, but torch sees no CUDA device here; use --device cpu")


def torch_devices(device: str | None = "auto") -> list[str]:
    """Torch devices to place a model on: ["cpu"], ["cuda"], ["cuda:1"] or ["cuda:0", "cuda:1"]."""
    kind, gpus = parse(device)
    if kind == "auto":
        import torch

        return ["cuda" if torch.cuda.is_available() else "cpu"]
    if kind == "cuda":
        _check_cuda(device)
        return [f"cuda:{g}" for g in gpus] or ["cuda"]
    return ["cpu"]


def torch_device(device: str | None = "auto") -> str:
    """One torch device ("auto" resolved); a GPU list comes back as given, for callers that split over it."""
    devices = torch_devices(device)
    return devices[0] if len(devices) == 1 else str(device)


def vllm_placement(device: str | None) -> tuple[str, int, str | None]:
    """``(kind, tensor-parallel size, CUDA_VISIBLE_DEVICES)``: "cpu"/"auto" -> (kind, 1, None); "cuda:0,1" -> ("cuda", 2, "0,1")."""
    kind, gpus = parse(device)
    if kind in ("auto", "cpu"):
        return kind, 1, None
    return "cuda", max(1, len(gpus)), ",".join(map(str, gpus)) or None


def ort_providers(device: str | None) -> tuple[str, list]:
    """``(device, providers)`` for an onnxruntime session; one GPU at most."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    kind, gpus = parse(device)
    if kind == "auto":
        kind = "cuda" if "CUDAExecutionProvider" in have else "cpu"
    if kind == "cpu":
        return "cpu", ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in have:
        raise QuantError(f"--device {device} needs onnxruntime-gpu (this onnxruntime has {', '.join(have)}); "
                         "pip install onnxruntime-gpu or use --device cpu")
    if len(gpus) > 1:
        raise QuantError(f"--device {device}: onnxruntime runs on one GPU; use cuda or cuda:N")
    idx = gpus[0] if gpus else 0
    return (f"cuda:{idx}" if gpus else "cuda"), [("CUDAExecutionProvider", {"device_id": idx}), "CPUExecutionProvider"]
