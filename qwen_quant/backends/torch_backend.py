"""The PyTorch backend: transformers' Qwen2 on CUDA when present, else CPU, in a chosen dtype."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qwen_quant.backends.base import Backend


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model_or_path, device: str = "auto", dtype: str | None = None):
        import torch

        from qwen_quant.models.loader import DTYPES, load_model, pick_device

        self.device = pick_device(device)
        if isinstance(model_or_path, torch.nn.Module):
            self.model = model_or_path.eval()
            self.device = str(next(self.model.parameters()).device)
        else:
            dtype = dtype or ("float32" if self.device == "cpu" else "bfloat16")
            self.model = load_model(model_or_path, self.device, dtype)
        self.dtype = str(next(self.model.parameters()).dtype).replace("torch.", "")
        self.vocab_size = int(self.model.config.vocab_size)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.as_tensor(np.asarray(ids, dtype=np.int64), device=self.device)
            out = self.model(input_ids=x, use_cache=False).logits
            return out.float().cpu().numpy()

    def greedy(self, prompt_ids: Sequence[int], n: int) -> list[int]:
        import torch

        out: list[int] = []
        with torch.inference_mode():
            x = torch.tensor([list(prompt_ids)], device=self.device)
            past = None
            for _ in range(n):
                res = self.model(input_ids=x, past_key_values=past, use_cache=True)
                past = res.past_key_values
                nxt = int(res.logits[0, -1].float().argmax())
                out.append(nxt)
                x = torch.tensor([[nxt]], device=self.device)
        return out

    def versions(self) -> dict[str, str]:
        import torch
        import transformers

        v = {"torch": torch.__version__, "transformers": transformers.__version__}
        if self.device.startswith("cuda"):
            v["cuda"] = str(torch.version.cuda)
            v["gpu"] = torch.cuda.get_device_name(torch.device(self.device))
        return v

    def close(self) -> None:
        import gc

        import torch

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
