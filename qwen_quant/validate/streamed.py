"""Layer-streamed evaluation: an artifact against its reference when the two do not fit the device.

The idea of the layer-by-layer quantizer (`qwen_quant.quantize.layerwise.Layerwise`: a meta-device
skeleton whose decoder layers are materialised from the checkpoint's shards one at a time), applied
to validation. The hidden states of *every* evaluation window stay on the device, one set per model;
for each decoder layer ``i`` the reference's layer ``i`` is loaded, every window advances through it,
it is freed, then the same for the artifact's layer ``i``. Each layer is read once from disk, and the
device holds about one layer (plus the next one's tensors, prefetched on the host by a thread while
the current layer computes) and the activations: for Qwen2-72B (1.75 GB per bf16 layer) over 48k
tokens that is a few GB instead of the 290 GB of two whole models. At the end the final norm and
lm_head of each model project the scored positions, window by window, into the same device metrics
as the whole-model path (`metrics.window_scores`).

Quantized artifacts (GPTQ, AWQ, compressed-tensors pack-quantized) are read with the project's
unpackers: each quantized linear is dequantized when its layer is loaded, so the artifact is measured
as written, exactly as `formats.load_dequantized` does for a whole model.

Greedy parity needs a KV cache over all layers at every step, so it is not streamed: the caller runs
it with whole models (on several GPUs when given) or records why it was skipped (see `run_eval`).
Memory for the activations: ``n_tokens x hidden x 2 bytes`` per model, twice during a layer.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from qwen_quant.errors import QuantError
from qwen_quant.progress import progress
from qwen_quant.quantize.layerwise import Layerwise, get_module
from qwen_quant.validate.metrics import Accumulator, windows


class StreamedCheckpoint(Layerwise):
    """`Layerwise` over a full-precision or quantized checkpoint: quantized linears come back dense."""

    def __post_init__(self):
        raw = json.loads((Path(self.model_dir) / "config.json").read_text())
        self.qc = raw.get("quantization_config") or {}
        self.method = self.qc.get("quant_method")
        self.tied = bool(raw.get("tie_word_embeddings", False))
        super().__post_init__()

    def _tensor(self, name: str) -> torch.Tensor:
        if name in self.store:
            return super()._tensor(name)
        base = name.rsplit(".", 1)[0]
        if name == f"{self.family.lm_head_path}.weight" and self.tied:
            return super()._tensor(f"{self.family.embed_path}.weight")
        if name.endswith(".weight") and f"{base}.qweight" in self.store and self.method in ("gptq", "awq"):
            if self.method == "gptq":
                from qwen_quant.formats.gptq import dequantize
            else:
                from qwen_quant.formats.awq import dequantize
            parts = {k: self.store.get(k) for k in self.store.names(base + ".")}
            return dequantize(parts, base, self.qc["bits"])
        if name.endswith(".weight") and f"{base}.weight_packed" in self.store:
            return _ct_dequantize(self.store, base, self.qc)
        raise QuantError(f"{self.model_dir}: tensor {name} is missing and cannot be rebuilt from a quantized form; "
                         "is the checkpoint complete?")

    def host_tensors(self, path: str) -> dict[str, torch.Tensor]:
        """Module ``path``'s tensors on the host (read and dequantized), ready to move to the device."""
        module = get_module(self.skeleton, path)
        return {k: self._tensor(f"{path}.{k}") for k in module.state_dict()}

    def assign(self, path: str, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
        module = get_module(self.skeleton, path)
        module.load_state_dict({k: v.to(self.device, self.dtype, non_blocking=True) for k, v in tensors.items()},
                               assign=True)
        return module


def _ct_dequantize(store, base: str, qc: dict) -> torch.Tensor:
    """A compressed-tensors pack-quantized linear, unpacked by the compressed-tensors library itself."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    scheme = QuantizationScheme(**next(iter(qc["config_groups"].values())))
    data = {k[len(base) + 1:]: store.get(k) for k in store.names(base + ".") if not k.endswith(".bias")}
    return PackedQuantizationCompressor.decompress(data, scheme)["weight"].float()


def _open(path, device: str, dtype: torch.dtype, batch_size: int) -> StreamedCheckpoint:
    from qwen_quant.models.loader import check_model

    p, cfg, fam = check_model(path)
    return StreamedCheckpoint(str(p), cfg, fam, device=device, dtype=dtype, batch_size=batch_size)


def evaluate_streamed(artifact, reference, tokens: np.ndarray, cfg, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                      phases: dict | None = None, stats: dict | None = None) -> dict:
    """Perplexity, KL and top-1 of ``artifact`` against ``reference``, one decoder layer at a time.

    ``cfg`` is an `EvalConfig` (ctx, method, stride, batch_size). ``phases`` (if given) gets the wall
    seconds of "load" (reading/dequantizing layers, not overlapped with compute) and "scoring";
    ``stats`` (if given) gets "layer_s" (wall seconds per decoder layer, reference + artifact),
    "embed_s" and "head_s" (final norm + lm_head + metrics), for benchmarks.
    """
    wins = windows(len(tokens), cfg.ctx, cfg.method, cfg.stride)
    if not wins:
        raise QuantError(f"the evaluation text has {len(tokens)} tokens, fewer than --ctx {cfg.ctx}; lower --ctx or give a longer text")
    bs = max(1, cfg.batch_size or (8192 // cfg.ctx if device.startswith("cuda") else 4))
    models = [_open(reference, device, dtype, bs), _open(artifact, device, dtype, bs)]
    n_layers = [m.hf_config.num_hidden_layers for m in models]
    if n_layers[0] != n_layers[1] or models[0].hf_config.vocab_size != models[1].hf_config.vocab_size:
        raise QuantError(f"{artifact} ({n_layers[1]} layers) does not have the shape of {reference} ({n_layers[0]} layers); "
                         "is the reference the model this artifact was made from?")
    ids = torch.as_tensor(np.stack([tokens[w.start:w.start + cfg.ctx] for w in wins]).astype(np.int64))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    t_load = 0.0
    t0 = time.perf_counter()
    stats = {} if stats is None else stats
    stats["layer_s"] = []
    with torch.inference_mode():
        hidden = [m.embed(ids) for m in models]
        sync()
        stats["embed_s"] = time.perf_counter() - t0
        t_layer = time.perf_counter()
        fam = models[0].family
        order = [(k, f"{fam.layers_path}.{i}") for i in range(n_layers[0]) for k in (0, 1)]
        tail = [(k, p) for k in (0, 1) for p in (fam.norm_path, fam.lm_head_path)]
        with ThreadPoolExecutor(1) as pool, progress("streamed eval (ref + artifact)", total=n_layers[0], unit="layers") as advance:
            todo = order + tail
            nxt = pool.submit(models[todo[0][0]].host_tensors, todo[0][1])
            for j, (k, path) in enumerate(todo):
                tl = time.perf_counter()
                host = nxt.result()
                t_load += time.perf_counter() - tl
                if j + 1 < len(todo):
                    nxt = pool.submit(models[todo[j + 1][0]].host_tensors, todo[j + 1][1])
                module = models[k].assign(path, host)
                del host
                if path.startswith(fam.layers_path + "."):
                    hidden[k] = models[k].forward(module, hidden[k])
                    models[k].unload(path)
                    if k == 1:
                        sync()
                        stats["layer_s"].append(time.perf_counter() - t_layer)
                        t_layer = time.perf_counter()
                        advance()
        acc = Accumulator()
        norms = [get_module(m.skeleton, fam.norm_path) for m in models]
        heads = [get_module(m.skeleton, fam.lm_head_path) for m in models]
        for w_i, w in enumerate(wins):
            sl = slice(w.score_from, cfg.ctx - 1)
            lg = [heads[k](norms[k](hidden[k][w_i, sl])) for k in (0, 1)]
            acc.add(lg[1], ids[w_i, w.score_from + 1:].to(lg[1].device), lg[0])
        for k in (0, 1):
            for path in (fam.norm_path, fam.lm_head_path):
                models[k].unload(path)
        sync()
        stats["head_s"] = time.perf_counter() - t_layer
    if phases is not None:
        phases["load"] = round(phases.get("load", 0.0) + t_load, 3)
        phases["scoring"] = round(phases.get("scoring", 0.0) + time.perf_counter() - t0 - t_load, 3)
    del hidden
    return acc.result()


def model_bytes(path, dtype_bytes: int = 2) -> int:
    """Bytes of ``path``'s weights when dense at ``dtype_bytes`` per parameter (from config.json)."""
    from qwen_quant.models.loader import load_text_config

    c = load_text_config(path)
    h, inter, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    heads = c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or heads
    hd = h // heads
    per_layer = h * (heads * hd) * 2 + h * (kv * hd) * 2 + 3 * h * inter + (heads + 2 * kv) * hd + 2 * h
    params = layers * per_layer + vocab * h * (1 if c.get("tie_word_embeddings") else 2) + h
    return params * dtype_bytes


def free_bytes(devices: list[str]) -> int:
    """Free memory over ``devices``: GPU memory from the driver, host memory from /proc/meminfo."""
    total = 0
    for d in devices:
        if d.startswith("cuda"):
            total += torch.cuda.mem_get_info(torch.device(d))[0]
        else:
            try:
                line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable"))
                total += int(line.split()[1]) * 1024
            except (OSError, StopIteration):
                total += 2**62  # unknown: assume it fits and let the loader fail loudly
    return total


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def plan(reference, devices: list[str], dtype_bytes: int, work_bytes: int, streamed: bool | None = None,
         free: int | None = None, cached_ref: bool = False) -> tuple[bool, str, list[str]]:
    """(streamed?, greedy mode, notes) for a reference + artifact pair on ``devices``.

    Both models dense at the compute dtype (a quantized artifact is dequantized on load) plus
    ``work_bytes`` of activations must fit the free memory of ``devices`` for whole-model scoring;
    otherwise scoring is streamed. Greedy: "together" when both fit, "sequential" (reference, then
    artifact, each loaded alone) when one fits, else "skip" with the reason in the notes.
    ``cached_ref``: the reference is already loaded there (its bytes are in use, not needed again).
    """
    one = model_bytes(reference, dtype_bytes)
    free = free_bytes(devices) if free is None else free
    have = free + (one if cached_ref else 0)
    both_fit = 2 * one + work_bytes <= have
    one_fits = one + work_bytes // 2 <= have
    where = ",".join(devices)
    notes = []
    if streamed is None:
        streamed = not both_fit
        if streamed:
            notes.append(f"streamed: reference + artifact do not fit on {where} (need {_gib(2 * one + work_bytes)}, "
                         f"have {_gib(have)} free); scored layer by layer")
    elif streamed:
        notes.append("streamed: asked for with --streamed; scored layer by layer")
    if not streamed:
        return False, "together", notes
    if one_fits:
        notes.append(f"greedy parity: reference and artifact decoded one after the other ({_gib(one)} each on {where})")
        return True, "sequential", notes
    notes.append(f"greedy parity skipped: one model needs {_gib(one)}, {where} has {_gib(have)} free; "
                 "give more GPUs with --device cuda:0,1,... for greedy parity")
    return True, "skip", notes
