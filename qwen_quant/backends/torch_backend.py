"""The PyTorch backend: transformers' Qwen2 on CUDA when present, else CPU, in a chosen dtype.

Logits stay on the device (`device_logits`, only the positions asked for are projected onto the
vocabulary); greedy decoding runs every prompt in one left-padded batch with a KV cache.

A model larger than one GPU is split over several with ``device="cuda:0,1"`` (or ``"cuda:0,cuda:1"``):
accelerate's `infer_auto_device_map` places whole decoder layers on the GPUs in order (within
``max_memory``) and transformers' hooks move activations between them (pipeline placement, one GPU
busy at a time: meant for greedy parity of a 72B model, not for speed); the budget per GPU is
accelerate's balanced split (`get_balanced_memory`), so a model that would fit one GPU is still spread. `plan_device_map` is the
same placement without loading anything, for a dry run or a test.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qwen_quant.backends.base import Backend
from qwen_quant.devices import torch_devices


def _layer_class(model) -> list[str]:
    return sorted({type(m).__name__ for m in model.modules() if type(m).__name__.endswith("DecoderLayer")})


def plan_device_map(model, devices: Sequence[str], max_memory: dict | None = None) -> dict[str, str]:
    """Where each module goes over ``devices`` (whole decoder layers, in order); ``model`` may be on meta.

    ``max_memory``: bytes per device (default: balanced, within 90% of each GPU's free memory).
    """
    import torch
    from accelerate import infer_auto_device_map

    from accelerate.utils import get_balanced_memory

    keys = [torch.device(d).index if torch.device(d).type == "cuda" else d for d in devices]
    no_split, dtype = _layer_class(model), next(model.parameters()).dtype
    if max_memory is None:  # balanced over the GPUs (as device_map="balanced"), within 90% of what is free
        free = {k: int(0.9 * torch.cuda.mem_get_info(k)[0]) for k in keys}
        max_memory = get_balanced_memory(model, max_memory=free, no_split_module_classes=no_split, dtype=dtype)
    dmap = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    return {name: (f"cuda:{d}" if isinstance(d, int) else str(d)) for name, d in dmap.items()}


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model_or_path, device: str = "auto", dtype: str | None = None):
        import torch

        from qwen_quant.models.loader import load_model

        devices = torch_devices(device)  # a clear error when CUDA is asked for and absent
        self.device = ",".join(devices)
        if isinstance(model_or_path, torch.nn.Module):
            self.model = model_or_path.eval()
            self.device = str(next(self.model.parameters()).device)
        else:
            dtype = dtype or ("float32" if devices[0] == "cpu" else "bfloat16")
            if len(devices) == 1:
                self.model = load_model(model_or_path, devices[0], dtype)
            else:
                self.model = self._load_split(model_or_path, devices, dtype)
        self.dtype = str(next(self.model.parameters()).dtype).replace("torch.", "")
        self.vocab_size = int(self.model.config.vocab_size)
        self.input_device = self.model.get_input_embeddings().weight.device

    @staticmethod
    def _load_split(path, devices: list[str], dtype: str):
        """Whole layers over ``devices``: full-precision checkpoints load shard by shard straight onto
        their GPUs (transformers' ``device_map``, so a 72B model never passes through host memory);
        GPTQ/AWQ checkpoints are dequantized on the host by our unpackers, then dispatched (needs
        host memory for the dense model)."""
        import os

        from accelerate import dispatch_model, init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from qwen_quant.models.loader import check_model, load_model, torch_dtype

        p, cfg, _ = check_model(path)
        if (cfg.get("quantization_config") or {}).get("quant_method") is None:
            dt = torch_dtype(dtype, devices[0])
            with init_empty_weights():
                skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(p)), dtype=dt)
            dmap = plan_device_map(skeleton, devices)
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            return AutoModelForCausalLM.from_pretrained(str(p), dtype=dt, device_map=dmap).eval()
        model = load_model(path, "cpu", dtype)
        return dispatch_model(model, device_map=plan_device_map(model, devices))

    def device_logits(self, ids: np.ndarray, keep: int | None = None):
        import torch

        with torch.inference_mode():
            x = torch.as_tensor(np.asarray(ids, dtype=np.int64)).to(self.input_device)
            kw = {} if keep is None else {"logits_to_keep": int(keep)}
            return self.model(input_ids=x, use_cache=False, **kw).logits

    def logits(self, ids: np.ndarray) -> np.ndarray:
        return self.device_logits(ids).float().cpu().numpy()

    def greedy(self, prompt_ids: Sequence[int], n: int) -> list[int]:
        return self.greedy_batch([prompt_ids], n)[0]

    def greedy_batch(self, prompts: Sequence[Sequence[int]], n: int) -> list[list[int]]:
        """All prompts decoded together: left padding, masked, positions counted from each prompt's start.

        The per-prompt tokens equal unbatched decoding (tested in float32 on the CPU); in bf16 on a GPU
        different batch shapes can round differently, so artifact and reference are always decoded
        with the same batch.
        """
        import torch

        if n <= 0 or not prompts:
            return [[] for _ in prompts]
        dev = self.input_device
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            if len(p):
                ids[i, width - len(p):] = torch.as_tensor(list(p))
                mask[i, width - len(p):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = []
        with torch.inference_mode():
            res = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
            for step in range(n):
                nxt = res.logits[:, -1].argmax(-1).to(dev)
                out.append(nxt)
                if step + 1 == n:
                    break
                mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], 1)
                pos = pos[:, -1:] + 1
                res = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                                 past_key_values=res.past_key_values, use_cache=True)
        return torch.stack(out, 1).cpu().tolist()

    def versions(self) -> dict[str, str]:
        import torch
        import transformers

        v = {"torch": torch.__version__, "transformers": transformers.__version__}
        if self.device.startswith("cuda"):
            v["cuda"] = str(torch.version.cuda)
            v["gpu"] = torch.cuda.get_device_name(torch.device(self.device.split(",")[0]))
        return v

    def close(self) -> None:
        import gc

        import torch

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
