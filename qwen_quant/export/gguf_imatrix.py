"""Importance matrix for GGUF quantization, computed in torch from our calibration samples.

llama.cpp's ``llama-imatrix`` runs text through llama.cpp and, for every matmul weight of a block
(``blk.*``), accumulates the per-input-column sum of x^2 over tokens plus the token count; the quantizer
then uses sum/count as the weight of each column in its rounding-error objective. We collect the
same statistic with forward pre-hooks on the torch model's ``nn.Linear`` layers, so the importance
comes from the exact calibration set the GPTQ/AWQ paths use and no llama.cpp eval build is needed.
Hand-written because it is ~40 lines and no library exposes these statistics for a HF model.

Mixture-of-Experts layers: llama.cpp keeps one 3-D tensor per projection (``blk.N.ffn_gate_exps``),
and llama-imatrix stores for it one row of column statistics per expert (``n_expert * n_in`` values),
each from the tokens routed to that expert only. transformers 5 runs the experts fused
(``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]) rather than as ``nn.Linear``, so a pre-hook on
the experts module reads the routed token indices and computes each expert's gate/up input (the
normed hidden state) and down input (``act(gate) * up``) itself. An expert no calibration token
reached gets importance 1 on every column (plain, unweighted rounding) instead of a division by zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import gguf
import numpy as np

from qwen_quant.errors import QuantError


@dataclass
class ImatrixStats:
    """Per GGUF tensor name: sum over tokens of x^2 per input column, and the token count."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int | np.ndarray] = field(default_factory=dict)  # an array: one count per expert

    def values(self) -> dict[str, np.ndarray]:
        """sum/count per column: what llama-quantize reads from an imatrix file (expert rows concatenated)."""
        out = {}
        for k, s in self.sums.items():
            c = self.counts[k]
            if np.ndim(c) == 0:
                if c > 0:
                    out[k] = (s / c).astype(np.float32)
                continue
            rows = s.reshape(len(c), -1)
            mean = np.where(c[:, None] > 0, rows / np.maximum(c, 1)[:, None], 1.0)
            out[k] = mean.reshape(-1).astype(np.float32)
        return out


def compute_imatrix(model, samples: Iterable[Sequence[int]], n_layers: int | None = None) -> ImatrixStats:
    """Run ``samples`` (token id rows) through a HF Qwen2 ``model`` and collect x^2 sums per linear.

    Only linears inside decoder blocks are recorded (``blk.*`` in GGUF), like llama-imatrix without
    ``--process-output``.
    """
    import torch

    from qwen_quant.export.gguf import gguf_arch
    from qwen_quant.models.registry import detect_family

    n_layers = n_layers or model.config.num_hidden_layers
    name_map = gguf.get_tensor_name_map(gguf_arch(detect_family(model.config.to_dict())), n_layers)
    stats = ImatrixStats()
    hooks = []

    def hook(gguf_name):
        def fn(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
            s = (x * x).sum(0).cpu().numpy().astype(np.float64)
            stats.sums[gguf_name] = stats.sums.get(gguf_name, 0) + s
            stats.counts[gguf_name] = stats.counts.get(gguf_name, 0) + x.shape[0]
        return fn

    def expert_hook(names):
        gate_name, up_name, down_name = names

        def fn(mod, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            idx = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
            x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
            n_exp, n_ff = mod.gate_up_proj.shape[0], mod.down_proj.shape[-1]
            s_in, s_ff = np.zeros((n_exp, x.shape[1])), np.zeros((n_exp, n_ff))
            cnt = np.zeros(n_exp, dtype=np.int64)
            for e in range(n_exp):
                tok = (idx.reshape(x.shape[0], -1) == e).any(-1).nonzero().flatten()
                if tok.numel() == 0:
                    continue
                xe = x[tok]
                gate, up = torch.nn.functional.linear(xe, mod.gate_up_proj[e].float()).chunk(2, dim=-1)
                h = mod.act_fn(gate) * up
                s_in[e], s_ff[e], cnt[e] = (xe * xe).sum(0).cpu().numpy(), (h * h).sum(0).cpu().numpy(), tok.numel()
            for gname, sums in ((gate_name, s_in), (up_name, s_in), (down_name, s_ff)):
                stats.sums[gname] = stats.sums.get(gname, 0) + sums.reshape(-1)
                stats.counts[gname] = stats.counts.get(gname, 0) + cnt
        return fn

    for name, mod in model.named_modules():
        if isinstance(getattr(mod, "gate_up_proj", None), torch.nn.Parameter) and mod.gate_up_proj.ndim == 3:
            names = [name_map.get_name(f"{name}.{p}.weight", try_suffixes=(".weight",)) for p in ("gate_proj", "up_proj", "down_proj")]
            if all(n is not None and n.startswith("blk.") for n in names):
                hooks.append(mod.register_forward_pre_hook(expert_hook(names), with_kwargs=True))
        elif isinstance(mod, torch.nn.Linear):
            gname = name_map.get_name(name + ".weight", try_suffixes=(".weight",))
            if gname is not None and gname.startswith("blk."):
                hooks.append(mod.register_forward_pre_hook(hook(gname)))
    if not hooks:
        raise QuantError("found no decoder linears to collect an importance matrix from; is this a Qwen model?")
    device = next(model.parameters()).device
    body = getattr(model, "base_model", model)  # skip lm_head: its 152k-row matmul is most of the cost
    n = 0
    try:
        with torch.inference_mode():
            for row in samples:
                ids = torch.as_tensor(np.asarray(row, dtype=np.int64), device=device).reshape(1, -1)
                body(input_ids=ids, use_cache=False)
                n += 1
    finally:
        for h in hooks:
            h.remove()
    if n == 0:
        raise QuantError("no calibration samples for the importance matrix; give --calib data with at least one sample")
    return stats


def imatrix_for_model(model_dir: Path, samples: Iterable[Sequence[int]]) -> ImatrixStats:
    """Load ``model_dir`` in fp32 on CPU/GPU and compute its importance matrix on ``samples``."""
    from qwen_quant.models.loader import load_model

    model = load_model(model_dir, device="auto", dtype="float32")
    try:
        return compute_imatrix(model, samples)
    finally:
        del model
