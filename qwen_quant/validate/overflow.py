"""fp16-overflow detection: per-layer activation peaks of the reference on chat prompts, and the fp16 run's parity there.

Real Qwen2 models overflow float16 in the MLP of a few layers on chat-formatted input: some intermediate
units fire enormously on the ChatML control tokens, ``act(gate) * up`` passes 65504 and the layer
returns inf, then NaN ("!!!!" output in vLLM and llama.cpp). bf16 and fp32 have the range, so the
reference never shows it, and plain evaluation text may not trigger it at all. So whenever an artifact
is validated in fp16 (any backend), `annotate_fp16`:

1. runs the reference (a torch model in bf16/fp32) on the shipped parity prompts rendered with the chat
   template, with forward hooks on every decoder layer: the largest |value| of the layer's output (the
   residual stream), of the MLP intermediate (down_proj's input) and of every linear's input and output.
   The residual alone is not enough: an overflow inside the MLP can be undone by down_proj and leave
   the residual in range while fp16 has already produced inf.
2. scores the same chat prompts on the fp16 backend and compares them with the reference: non-finite
   log-probs, KL and top-1 agreement.
3. writes both to ``Result.extra["fp16_overflow"]`` and, when a layer's peak reaches ``WARN_FRACTION`` x
   65504 or the fp16 run is non-finite on a chat prompt, a warning to ``Result.notes``.

Hand-written because it is a few hooks over the model's own modules; no library reports per-layer
peaks against the fp16 limit.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

FP16_MAX = 65504.0
WARN_FRACTION = 0.5  # "near the limit": half of fp16's max (one more doubling of a unit overflows)
FP16_DTYPES = ("float16", "f16")
CHAT_PROMPTS = 4  # the first shipped prompts: Qwen's overflow fires on the ChatML tokens every prompt has


def chat_prompts(tokenizer, texts: Sequence[str] | None = None) -> list[list[int]]:
    """The shipped parity prompts as user turns through the chat template (ChatML for Qwen)."""
    from qwen_quant.calib import greedy_prompts
    from qwen_quant.calib.sampling import render_chatml

    texts = list(texts) if texts is not None else [t for t, _ in greedy_prompts(tokenizer)]
    out = []
    for t in texts:
        msgs = [{"role": "user", "content": t}]
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        else:
            ids = tokenizer.encode(render_chatml(msgs) + "<|im_start|>assistant\n", add_special_tokens=False)
        out.append([int(i) for i in ids])
    return out


def _decoder_layers(model):
    from qwen_quant.models.registry import detect_family

    return model.get_submodule(detect_family(model.config.to_dict()).layers_path)


def layer_peaks(model, prompts: Sequence[Sequence[int]]) -> tuple[list[dict], list[torch.Tensor]]:
    """Per decoder layer: max |residual|, |MLP intermediate|, |linear input|, |linear output| over the
    prompts; plus the model's logits for each prompt (reused for the parity check)."""
    layers = _decoder_layers(model)
    peaks = [{"layer": i, "residual": 0.0, "mlp_intermediate": 0.0, "linear_in": 0.0, "linear_out": 0.0}
             for i in range(len(layers))]
    hooks = []

    def bump(i, key, t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            peaks[i][key] = max(peaks[i][key], float(t.detach().abs().amax().float()))

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(
            lambda m, a, out, i=i: bump(i, "residual", out[0] if isinstance(out, tuple) else out)))
        for name, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear):
                hooks.append(mod.register_forward_pre_hook(lambda m, a, i=i: bump(i, "linear_in", a[0])))
                hooks.append(mod.register_forward_hook(lambda m, a, out, i=i: bump(i, "linear_out", out)))
                if name.endswith("down_proj"):
                    hooks.append(mod.register_forward_pre_hook(lambda m, a, i=i: bump(i, "mlp_intermediate", a[0])))
    logits = []
    dev = model.get_input_embeddings().weight.device
    try:
        with torch.inference_mode():
            for p in prompts:
                logits.append(model(input_ids=torch.tensor([list(p)], device=dev), use_cache=False).logits[0].float().cpu())
    finally:
        for h in hooks:
            h.remove()
    for p in peaks:
        p["peak"] = max(p["residual"], p["mlp_intermediate"], p["linear_in"], p["linear_out"])
        for k in ("residual", "mlp_intermediate", "linear_in", "linear_out", "peak"):
            p[k] = float(f"{p[k]:.6g}")
    return peaks, logits


def chat_parity(backend, prompts: Sequence[Sequence[int]], ref_logits: Sequence[torch.Tensor]) -> dict:
    """Non-finite positions, KL and top-1 of ``backend`` vs the reference on the chat prompts."""
    from qwen_quant.validate.metrics import window_scores

    bad = total = 0
    kls, tops = [], []
    for p, rl in zip(prompts, ref_logits):
        ids = np.asarray([list(p)], dtype=np.int64)
        lg = backend.logits(ids)
        nll, kl, top1, _ = window_scores(lg[0][:-1], ids[0, 1:], rl[:-1])
        finite = torch.isfinite(nll.double()) & torch.isfinite(kl.double())
        bad += int((~finite).sum())
        total += int(nll.numel())
        kls.append(kl.double()[finite])
        tops.append(top1[finite])
    kl = torch.cat(kls) if kls else torch.zeros(0)
    top = torch.cat(tops) if tops else torch.zeros(0, dtype=torch.bool)
    return {"positions": total, "nonfinite_positions": bad,
            "kl_mean": float(kl.mean()) if kl.numel() else math.nan,
            "top1_agreement": float(top.double().mean()) if top.numel() else math.nan}


def fp16_report(ref_model, backend, prompts: Sequence[Sequence[int]], warn_fraction: float = WARN_FRACTION) -> dict:
    """The record `annotate_fp16` writes under ``Result.extra["fp16_overflow"]``."""
    layers, ref_logits = layer_peaks(ref_model, prompts)
    top = max(layers, key=lambda d: d["peak"])
    near = [d["layer"] for d in layers if d["peak"] >= warn_fraction * FP16_MAX]
    chat = chat_parity(backend, prompts, ref_logits) if backend is not None else None
    return {"limit": FP16_MAX, "warn_at": warn_fraction * FP16_MAX, "prompts": len(prompts), "layers": layers,
            "peak": top["peak"], "peak_layer": top["layer"], "near_limit_layers": near, "chat": chat,
            "flagged": bool(near) or bool(chat and chat["nonfinite_positions"])}


def warning(rep: dict) -> str:
    """The one-line note for the report."""
    parts = []
    if rep["near_limit_layers"]:
        parts.append(f"layer(s) {', '.join(map(str, rep['near_limit_layers']))} reach {rep['peak']:.3g} on chat prompts "
                     f"(peak in layer {rep['peak_layer']}; fp16 max {FP16_MAX:.0f})")
    chat = rep.get("chat")
    if chat and chat["nonfinite_positions"]:
        parts.append(f"the fp16 run gave non-finite log-probs at {chat['nonfinite_positions']}/{chat['positions']} "
                     "chat-prompt positions")
    return ("fp16 overflow risk: " + "; ".join(parts) +
            "; validate and serve this model in bfloat16 (or float32) instead of float16")


def needs_check(backend) -> bool:
    return str(getattr(backend, "dtype", "")).lower() in FP16_DTYPES


def annotate_fp16(result, test_backend, ref_backend, tokenizer) -> None:
    """Add ``extra["fp16_overflow"]`` (and a warning note when flagged) to ``result`` for fp16 runs."""
    if test_backend is None or not needs_check(test_backend):
        return
    model = getattr(ref_backend, "model", None)
    if not isinstance(model, torch.nn.Module):
        result.notes.append("fp16 overflow check skipped: it needs the reference as a torch model (HF checkpoint)")
        return
    rep = fp16_report(model, test_backend, chat_prompts(tokenizer)[:CHAT_PROMPTS])
    result.extra["fp16_overflow"] = rep
    if rep["flagged"]:
        result.notes.append(warning(rep))
