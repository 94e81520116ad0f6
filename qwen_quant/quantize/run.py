"""`quantize_model`: inputs -> calibration -> layer-by-layer quantization -> checkpoint -> validation."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Callable

import torch

from qwen_quant.errors import QuantError
from qwen_quant.devices import torch_device
from qwen_quant.models import check_model, load_tokenizer
from qwen_quant.progress import log, progress
from qwen_quant.quantize.awq import AWQQuantizer
from qwen_quant.quantize.config import AWQConfig, GPTQConfig, QuantConfig, RTNConfig, plan_padding
from qwen_quant.quantize.gptq import Hessian, gptq_quantize, split_rows
from qwen_quant.quantize.grid import Grid, QuantResult, rtn_quantize
from qwen_quant.quantize.layerwise import Layerwise, get_module
from qwen_quant.quantize import moe
from qwen_quant.report import Report


def _relative_error(w: torch.Tensor, r: QuantResult, H: torch.Tensor) -> float:
    """||(W - Q) X||^2 / ||W X||^2 estimated through the input Hessian (undamped)."""
    d = w.float() - r.dequant()
    num = (d * (d @ H)).sum()
    den = (w.float() * (w.float() @ H)).sum()
    return float(num / den.clamp_min(1e-20))


def quantize_groups(lw: Layerwise, layer, groups, hidden, solve) -> dict[str, QuantResult]:
    """Capture the inputs of linears that share them, then ``solve(names, linears, H)`` per tuple.

    The one place where a layer's groups (``family.layer_groups``: tuples of linears that read the
    same tensor, q/k/v and gate/up) become capture + solve: one Hessian per tuple, results stay on
    the device (packing runs there too) and the layer's weights are replaced by their dequantized
    values, so later groups and the next layer see the quantized model.
    """
    if groups and isinstance(groups[0], str):  # a single tuple of linears sharing an input
        groups = (tuple(groups),)
    firsts = [g[0] for g in groups]
    stats = {n: Hessian(get_module(layer, n).in_features, lw.device) for n in firsts}
    lw.capture(layer, firsts, lambda n, x: stats[n].add(x), hidden)
    out = {}
    for g in groups:
        lins = [get_module(layer, n) for n in g]
        st = stats.pop(g[0])
        H = st.S.mul_(2.0 / max(st.n, 1))  # the Hessian, in place of the sum
        del st
        parts = solve(lins, H)
        del H
        for n, lin, r in zip(g, lins, parts):
            lin.weight.data = r.dequant().to(lin.weight.dtype)
            out[n] = r
    return out


class _GroupQuantizer:
    """Driver side shared by GPTQ and RTN: true-sequential passes over the family's groups."""

    def __init__(self, cfg: QuantConfig, grid: Grid):
        self.cfg, self.grid = cfg, grid

    def quantize_layer(self, lw: Layerwise, layer, hidden, layer_index: int) -> dict[str, QuantResult]:
        # true-sequential: each group's inputs are recaptured after the earlier groups were
        # quantized (4 capture passes); otherwise one pass captures every linear's input
        # (a MoE layer's experts are one pass: each expert's linears are their own group)
        groups = lw.family.layer_groups(lw.config, layer_index)
        passes = moe.passes(groups) if self.cfg.true_sequential else [groups]
        results: dict[str, QuantResult] = {}
        for gs in passes:
            plain, experts = moe.split_experts(lw.family, gs)
            if plain:
                results.update(quantize_groups(lw, layer, plain, hidden, self.solve))
            if experts:
                results.update(moe.quantize_experts(lw, layer, experts, hidden, self))
        return results


class GPTQQuantizer(_GroupQuantizer):
    def solve(self, lins, H) -> list[QuantResult]:
        """GPTQ solves a tuple of linears as one stacked matrix under their shared Hessian."""
        W = torch.cat([lin.weight.data for lin in lins]) if len(lins) > 1 else lins[0].weight.data
        r = gptq_quantize(W, H, self.grid, damp=self.cfg.damp, desc_act=self.cfg.desc_act, own_hessian=True)
        return split_rows(r, [lin.out_features for lin in lins])

    def solve_batched(self, lins_per_expert, H):
        """Experts of one MoE layer in one batched solve (``H`` [E, K, K]); None where it cannot be."""
        if self.cfg.desc_act:
            return None
        from qwen_quant.quantize.gptq_batched import gptq_quantize_batched

        W = torch.stack([torch.cat([lin.weight.data for lin in lins]) for lins in lins_per_expert])
        rs = gptq_quantize_batched(W, H, self.grid, damp=self.cfg.damp)
        return [split_rows(r, [lin.out_features for lin in lins]) for r, lins in zip(rs, lins_per_expert)]


class RTNQuantizer(_GroupQuantizer):
    def solve(self, lins, H) -> list[QuantResult]:
        parts = [rtn_quantize(lin.weight.data, self.grid) for lin in lins]
        for lin, r in zip(lins, parts):
            r.error = _relative_error(lin.weight.data, r, H)
        return parts


#: config type -> quantizer factory ``(cfg, grid) -> object with quantize_layer(lw, layer, hidden, i)``.
QUANTIZERS: dict[type, Callable] = {GPTQConfig: GPTQQuantizer, RTNConfig: RTNQuantizer, AWQConfig: AWQQuantizer}


def register_quantizer(config_type: type, factory: Callable) -> None:
    """Add a method: its config dataclass and the quantizer the driver builds from it."""
    QUANTIZERS[config_type] = factory


def quantizer_for(cfg: QuantConfig, grid: Grid):
    """Dispatch on the config's type (torchao style): the config decides the algorithm, nothing else."""
    for klass in type(cfg).__mro__:
        if klass in QUANTIZERS:
            return QUANTIZERS[klass](cfg, grid)
    raise QuantError(f"no quantizer for {type(cfg).__name__}; use GPTQConfig, RTNConfig or AWQConfig")


def _packer(cfg: QuantConfig, out_dtype: torch.dtype):
    if cfg.format == "gptq":
        from qwen_quant.formats import gptq

        return gptq.pack
    if cfg.format == "awq":
        from qwen_quant.formats import awq

        return awq.pack
    from qwen_quant.formats import ct

    return lambda name, r, bias: ct.pack(name, r.to("cpu"), None if bias is None else bias.cpu(), out_dtype)


def _check_experts(fam, hf: dict) -> None:
    """Refuse, in one line, expert layers in a family with linear-attention layers: the per-expert
    driver covers the MoE layers of qwen2_moe and qwen3_moe, not those of the hybrid families yet."""
    if fam.moe is None or not fam.layer_mix(hf) or not any(fam.moe.sparse(hf, i) for i in range(hf.get("num_hidden_layers", 0))):
        return
    raise QuantError(f"{fam.description}: quantizing the experts of its Mixture-of-Experts layers is not built in this "
                     "version; only checkpoints whose layers are all dense (num_experts 0) are taken")


def _ignored(fam, carried: dict) -> list[str]:
    """Modules a compressed-tensors config must name as not quantized: lm_head, the family's
    full-precision linears (routers, gates, in_proj_b/a) and the top modules of every tensor carried
    through outside the text model (``model.visual``, ``mtp``). Named by their own prefixes, so the
    patterns hold under either the multimodal class's or the text class's module names."""
    import re

    out = ["lm_head"] + [f"re:.*{re.escape('.' + n)}$" for n in fam.full_precision]
    tops = sorted({".".join(k.split(".")[:2]) if k.startswith("model.") else k.split(".")[0] for k in carried})
    return out + [f"re:^{re.escape(t)}\\..*" for t in tops]


def _format_config(cfg: QuantConfig, ignore: list[str] | None = None) -> dict:
    if cfg.format == "gptq":
        from qwen_quant.formats.gptq import quantization_config

        return quantization_config(cfg.bits, cfg.group_size, getattr(cfg, "desc_act", False), cfg.sym,
                                   getattr(cfg, "damp", 0.01), cfg.true_sequential)
    if cfg.format == "awq":
        from qwen_quant.formats.awq import quantization_config

        return quantization_config(cfg.bits, cfg.group_size, not cfg.sym)
    from qwen_quant.formats.ct import quantization_config

    return quantization_config(cfg.bits, cfg.group_size, cfg.sym, ignore or ["lm_head"])


def _dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".bin"))


class _Phases:
    """Seconds per phase of one layer (load, quantize, forward, pack, to_host) when ``enabled``
    (``cfg.phases``): each mark waits for the device, so it is off by default."""

    def __init__(self, device: str, enabled: bool):
        self.enabled, self.cuda = enabled, device.startswith("cuda")
        self.t = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str) -> None:
        if not self.enabled:
            return
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self.t, 4)
        self.t = now


def _warm_up(device: str) -> None:
    """One small GPTQ solve on the device (cuSOLVER/cuBLAS handles, the Triton kernel's compile),
    run on a thread while the tokenizer loads and the calibration ids are drawn; the kernel's
    signature (float32 pointers, strides divisible by 16) is the one the real layers launch."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(512, 256, device=device, generator=g)
    gptq_quantize(torch.randn(256, 256, device=device, generator=g), x.T @ x, Grid(4, 128, True))
    torch.cuda.synchronize(device)


def quantize_model(cfg: QuantConfig, on_layer: Callable[[str, dict], None] | None = None) -> tuple[Path, Report]:
    """Quantize with the method ``cfg``'s type names; ``on_layer(layer_path, results)`` sees each
    layer's `QuantResult`s (tests and benchmarks inspect the choices)."""
    import threading

    t_setup = time.perf_counter()
    setup: dict[str, float] = {}

    def mark(name: str) -> None:
        nonlocal t_setup
        now = time.perf_counter()
        setup[name] = round(now - t_setup, 3)
        t_setup = now

    cfg.check()
    src, raw_hf, fam = check_model(cfg.model)
    hf = fam.text(raw_hf)  # the text model's config (a multimodal checkpoint nests it)
    _check_experts(fam, hf)
    mark("check_model")
    out = Path(cfg.output)
    if out.exists() and not cfg.force:
        raise QuantError(f"output {out} already exists; pass --force to replace it or choose another -o")
    pad = plan_padding(cfg, hf, fam)
    device = torch_device(cfg.device)
    compute = torch.float32 if device == "cpu" else torch.float16
    out_dtype = torch.float16 if cfg.format in ("gptq", "awq") else torch.float32 if device == "cpu" else torch.bfloat16
    if cfg.format == "compressed-tensors":
        src_dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
        out_dtype = getattr(torch, src_dtype, torch.float32)
    grid = Grid(cfg.bits, cfg.group_size, cfg.sym)
    quantizer = quantizer_for(cfg, grid)
    warm = None
    if device.startswith("cuda") and isinstance(quantizer, GPTQQuantizer):
        warm = threading.Thread(target=_warm_up, args=(device,), name="qwen-quant-warm-up", daemon=True)
        warm.start()

    tok = load_tokenizer(src)
    mark("tokenizer")
    chat = cfg.chat if cfg.chat is not None else any(w in src.name.lower() for w in ("chat", "instruct"))
    calib = cfg.calib
    ids = calib.__class__(calib.source, calib.nsamples, calib.seqlen, calib.seed, chat).samples(tok)
    mark("calibration")
    log(f"{cfg.method} {cfg.bits}-bit g{cfg.group_size} {'sym' if cfg.sym else 'asym'}"
        f"{' desc_act' if getattr(cfg, 'desc_act', False) else ''} on {device}: {src} ({ids.shape[0]} x {ids.shape[1]} calibration tokens"
        f"{', chat-formatted' if chat else ''})")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    from qwen_quant.formats.checkpoint import CheckpointWriter
    from qwen_quant.quantize.overlap import BackgroundWriter

    t0 = time.perf_counter()
    lw = Layerwise(str(src), hf, fam, device=device, dtype=compute, intermediate_pad=pad, batch_size=cfg.batch_size)
    writer = BackgroundWriter(CheckpointWriter(out, force=cfg.force))  # writes overlap the next layer
    pack = _packer(cfg, out_dtype)
    moe.set_calibrate(lw.skeleton, cfg.moe_calibrate)
    expert_tokens: dict[str, list[int]] = {}
    per_layer = []
    mark("skeleton")
    try:
        hidden = lw.embed(ids)
        writer.add({k: v.to(out_dtype) for k, v in lw.raw(fam.embed_path).items()})
        mark("embed")
        if warm is not None:
            warm.join()  # a failed warm-up only means the first layer pays the compile
            mark("warm_up_wait")
        if device.startswith("cuda"):
            peak_before = torch.cuda.max_memory_allocated()
        n_layers = hf["num_hidden_layers"]
        with progress("quantizing layers", total=n_layers, unit="layers") as advance:
            for i in range(n_layers):
                t1 = time.perf_counter()
                phase = _Phases(device, cfg.phases)
                path = f"{fam.layers_path}.{i}"
                layer = lw.load(path)
                if i + 1 < n_layers:
                    lw.prefetch(f"{fam.layers_path}.{i + 1}")  # disk reads overlap this layer's compute
                phase("load")
                results = quantizer.quantize_layer(lw, layer, hidden, i)
                phase("quantize")
                moe.routed_counts(layer)  # reset: the propagating forward routes the tokens once
                hidden = lw.forward(layer, hidden, in_place=True)
                expert_tokens.update({f"{path}.{k}": v for k, v in moe.routed_counts(layer).items()})
                phase("forward")
                tensors = {}
                for name, mod in layer.named_modules():
                    if name in results:
                        tensors.update(pack(f"{path}.{name}", results[name], mod.bias))
                for k, v in layer.state_dict().items():
                    mod_name = k.rsplit(".", 1)[0]
                    if mod_name not in results:
                        tensors[f"{path}.{k}"] = v.to(out_dtype)
                phase("pack")
                writer.add(tensors)
                phase("to_host")
                if on_layer is not None:
                    on_layer(path, results)
                err = sum(r.error for r in results.values()) / len(results)
                per_layer.append({"layer": i, "seconds": round(time.perf_counter() - t1, 3), "mean_rel_error": err})
                if phase.enabled:
                    per_layer[-1]["phases"] = phase.seconds
                if device.startswith("cuda"):
                    per_layer[-1]["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                lw.unload(path)
                advance(info=f"layer {i}: {per_layer[-1]['seconds']:.1f}s, rel. error {err:.2e}")
        del hidden
        writer.add({k: v.to(out_dtype) for k, v in lw.raw(fam.norm_path).items()})
        if not hf.get("tie_word_embeddings", False):
            writer.add({k: v.to(out_dtype) for k, v in lw.raw(fam.lm_head_path).items()})
        carried = lw.carried((fam.embed_path, fam.layers_path, fam.norm_path, fam.lm_head_path))
        writer.add(carried)
        new_cfg = dict(raw_hf)
        if pad:
            key = fam.padding[0].key
            new_cfg[key] = hf[key] + pad
        new_cfg["quantization_config"] = _format_config(cfg, _ignored(fam, carried))
        if fam.full_precision and cfg.format in ("gptq", "awq"):  # routers, gates, in_proj_b/a unquantized
            new_cfg["quantization_config"]["modules_to_not_convert"] = ["lm_head", *fam.full_precision]
        new_cfg["dtype"] = new_cfg["torch_dtype"] = str(out_dtype).replace("torch.", "")
        t_drain = time.perf_counter()
        writer.finish(new_cfg, src)
        drain_s = time.perf_counter() - t_drain  # writes still queued after the last layer
    except BaseException:
        writer.abort()
        raise
    seconds = time.perf_counter() - t0
    peak_gpu = None
    if device.startswith("cuda"):  # the counter is reset per layer: the run's peak is the max of all spans
        peak_gpu = max([p["peak_gpu_bytes"] for p in per_layer] + [peak_before, torch.cuda.max_memory_allocated()])
    summary = {
        "source": str(src), "method": cfg.method, "format": cfg.format, "bits": cfg.bits, "group_size": cfg.group_size, "sym": cfg.sym,
        "desc_act": getattr(cfg, "desc_act", False), "damp": getattr(cfg, "damp", None), "true_sequential": cfg.true_sequential, "intermediate_pad": pad,
        "device": device,
        "options": {k: v for k, v in cfg.options().items() if k not in ("desc_act", "damp")},  # e.g. AWQ's clip
        "calibration": {"source": calib.source, "nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1]), "chat": chat,
                        "seed": calib.seed},
        "size_before_bytes": _dir_size(src), "size_after_bytes": _dir_size(out), "seconds": round(seconds, 2),
        "finish_seconds": round(drain_s, 2), "setup_seconds": setup,
        "peak_gpu_bytes": peak_gpu, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "layers": per_layer,
    }
    if fam.moe:
        summary["moe"] = moe.summary(cfg, fam, expert_tokens, quantizer)
    (out / "qwen-quant-quantize.json").write_text(json.dumps(summary, indent=2))
    report = Report(extra={"quantize": summary})
    if cfg.validate:
        from qwen_quant.validate import run_eval

        report.results.append(run_eval(out, cfg.eval, reference=src, device=device, artifact_type=f"{cfg.method}-int{cfg.bits}"))
        report.write_json(out / "qwen-quant-report.json")
    return out, report
