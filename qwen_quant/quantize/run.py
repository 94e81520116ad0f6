"""`quantize_model`: inputs -> calibration -> layer-by-layer quantization -> checkpoint -> validation."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch

from qwen_quant.errors import QuantError
from qwen_quant.models import check_model, load_tokenizer, pick_device
from qwen_quant.progress import log, progress
from qwen_quant.quantize.config import QuantConfig, plan_padding
from qwen_quant.quantize.gptq import Hessian, gptq_quantize, split_rows
from qwen_quant.quantize.grid import Grid, QuantResult, rtn_quantize
from qwen_quant.quantize.layerwise import Layerwise, get_module
from qwen_quant.quantize.moe import DEFAULT_MIN_TOKENS, full_precision_patterns, is_expert, routed_counts, set_calibrate
from qwen_quant.report import Report


def _relative_error(w: torch.Tensor, r: QuantResult, H: torch.Tensor) -> float:
    """||(W - Q) X||^2 / ||W X||^2 estimated through the input Hessian (undamped)."""
    d = w.float() - r.dequant()
    num = (d * (d @ H)).sum()
    den = (w.float() * (w.float() @ H)).sum()
    return float(num / den.clamp_min(1e-20))


def quantize_group(lw: Layerwise, layer, groups, hidden, cfg: QuantConfig, grid: Grid) -> dict[str, QuantResult]:
    """GPTQ or RTN for linears captured in one pass; ``groups``: tuples of linears that share an input.

    One Hessian per tuple (q/k/v and gate/up read the same tensor), and GPTQ solves each tuple as one
    stacked matrix; results stay on the device (packing runs there too).
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
        n_tokens = st.n
        del st
        if cfg.method == "gptq" and is_expert(lw.family, g[0]) and n_tokens < cfg.options.get("moe_min_tokens", DEFAULT_MIN_TOKENS):
            parts = [rtn_quantize(lin.weight.data, grid) for lin in lins]  # too few routed tokens for a Hessian
            for lin, r in zip(lins, parts):
                r.error = _relative_error(lin.weight.data, r, H) if n_tokens else 0.0
            if isinstance(cfg.options.get("moe_fallback"), list):
                cfg.options["moe_fallback"].extend(g)
        elif cfg.method == "gptq":
            W = torch.cat([lin.weight.data for lin in lins]) if len(lins) > 1 else lins[0].weight.data
            r = gptq_quantize(W, H, grid, damp=cfg.damp, desc_act=cfg.desc_act, own_hessian=True)
            del W
            parts = split_rows(r, [lin.out_features for lin in lins])
        else:
            parts = [rtn_quantize(lin.weight.data, grid) for lin in lins]
            for lin, r in zip(lins, parts):
                r.error = _relative_error(lin.weight.data, r, H)
        del H
        for n, lin, r in zip(g, lins, parts):
            lin.weight.data = r.dequant().to(lin.weight.dtype)
            out[n] = r
    return out


def _packer(cfg: QuantConfig, out_dtype: torch.dtype):
    if cfg.format == "gptq":
        from qwen_quant.formats import gptq

        return gptq.pack
    if cfg.format == "awq":
        from qwen_quant.formats import awq

        return awq.pack
    from qwen_quant.formats import ct

    return lambda name, r, bias: ct.pack(name, r.to("cpu"), None if bias is None else bias.cpu(), out_dtype)


def _format_config(cfg: QuantConfig, fam=None) -> dict:
    if cfg.format == "gptq":
        from qwen_quant.formats.gptq import quantization_config

        return quantization_config(cfg.bits, cfg.group_size, cfg.desc_act, cfg.sym, cfg.damp, cfg.true_sequential)
    if cfg.format == "awq":
        from qwen_quant.formats.awq import quantization_config

        return quantization_config(cfg.bits, cfg.group_size, not cfg.sym)
    from qwen_quant.formats.ct import quantization_config

    return quantization_config(cfg.bits, cfg.group_size, cfg.sym, ["lm_head", *full_precision_patterns(fam)] if fam else ["lm_head"])


def _dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".bin"))


class _Phases:
    """Seconds per phase of one layer (load, quantize, forward, pack, to_host) when ``enabled``
    (``options["phases"]``): each mark waits for the device, so it is off by default."""

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


def quantize_model(cfg: QuantConfig) -> tuple[Path, Report]:
    import threading

    t_setup = time.perf_counter()
    setup: dict[str, float] = {}

    def mark(name: str) -> None:
        nonlocal t_setup
        now = time.perf_counter()
        setup[name] = round(now - t_setup, 3)
        t_setup = now

    cfg.check()
    src, hf, fam = check_model(cfg.model)
    mark("check_model")
    out = Path(cfg.output)
    if out.exists() and not cfg.force:
        raise QuantError(f"output {out} already exists; pass --force to replace it or choose another -o")
    pad = plan_padding(cfg, hf, fam)
    device = pick_device(cfg.device)
    compute = torch.float32 if device == "cpu" else torch.float16
    out_dtype = torch.float16 if cfg.format in ("gptq", "awq") else torch.float32 if device == "cpu" else torch.bfloat16
    if cfg.format == "compressed-tensors":
        src_dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
        out_dtype = getattr(torch, src_dtype, torch.float32)
    grid = Grid(cfg.bits, cfg.group_size, cfg.sym)
    warm = None
    if device.startswith("cuda") and cfg.method == "gptq":
        warm = threading.Thread(target=_warm_up, args=(device,), name="qwen-quant-warm-up", daemon=True)
        warm.start()

    tok = load_tokenizer(src)
    mark("tokenizer")
    chat = cfg.chat if cfg.chat is not None else any(w in src.name.lower() for w in ("chat", "instruct"))
    calib = cfg.calib
    ids = calib.__class__(calib.source, calib.nsamples, calib.seqlen, calib.seed, chat).samples(tok)
    mark("calibration")
    log(f"{cfg.method} {cfg.bits}-bit g{cfg.group_size} {'sym' if cfg.sym else 'asym'}"
        f"{' desc_act' if cfg.desc_act else ''} on {device}: {src} ({ids.shape[0]} x {ids.shape[1]} calibration tokens"
        f"{', chat-formatted' if chat else ''})")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    from qwen_quant.formats.checkpoint import CheckpointWriter
    from qwen_quant.quantize.overlap import BackgroundWriter

    t0 = time.perf_counter()
    lw = Layerwise(str(src), hf, fam, device=device, dtype=compute, intermediate_pad=pad, batch_size=cfg.batch_size)
    writer = BackgroundWriter(CheckpointWriter(out, force=cfg.force))  # writes overlap the next layer
    pack = _packer(cfg, out_dtype)
    set_calibrate(lw.skeleton, cfg.options.get("moe_calibrate", "routed"))
    fallback = cfg.options.setdefault("moe_fallback", []) if fam.moe else None
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
                phase = _Phases(device, bool(cfg.options.get("phases")))
                path = f"{fam.layers_path}.{i}"
                layer = lw.load(path)
                if i + 1 < n_layers:
                    lw.prefetch(f"{fam.layers_path}.{i + 1}")  # disk reads overlap this layer's compute
                phase("load")
                results: dict[str, QuantResult] = {}
                quantize_layer = cfg.options.get("quantize_layer")
                if quantize_layer is not None:  # e.g. AWQ: scale search over the whole layer first
                    results = quantize_layer(lw, layer, hidden, cfg, grid)
                else:
                    # true-sequential: each group's inputs are recaptured after the earlier groups were
                    # quantized (4 capture passes); otherwise one pass captures every linear's input
                    groups = fam.layer_groups(hf, i)
                    passes = [(g,) for g in groups] if cfg.true_sequential else [groups]
                    for groups in passes:
                        results.update(quantize_group(lw, layer, groups, hidden, cfg, grid))
                phase("quantize")
                routed_counts(layer)  # reset: the propagating forward routes as the expert captures did
                hidden = lw.forward(layer, hidden, in_place=True)
                if fam.moe:
                    expert_tokens.update({f"{path}.{k}": v for k, v in routed_counts(layer).items()})
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
                if isinstance(cfg.options.get("results"), dict):  # tests and benchmarks inspect the choices
                    cfg.options["results"].update({f"{path}.{k}": v for k, v in results.items()})
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
        new_cfg = dict(hf)
        if pad:
            key = fam.padding[0].key
            new_cfg[key] = hf[key] + pad
        new_cfg["quantization_config"] = _format_config(cfg, fam)
        if fam.full_precision and cfg.format in ("gptq", "awq"):  # router and shared-expert gate unquantized
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
        "method": cfg.method, "format": cfg.format, "bits": cfg.bits, "group_size": cfg.group_size, "sym": cfg.sym,
        "desc_act": cfg.desc_act, "damp": cfg.damp, "true_sequential": cfg.true_sequential, "intermediate_pad": pad,
        "device": device,
        "options": {k: v for k, v in cfg.options.items() if isinstance(v, (bool, int, float, str))},  # e.g. AWQ's clip
        "calibration": {"source": calib.source, "nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1]), "chat": chat,
                        "seed": calib.seed},
        "size_before_bytes": _dir_size(src), "size_after_bytes": _dir_size(out), "seconds": round(seconds, 2),
        "finish_seconds": round(drain_s, 2), "setup_seconds": setup,
        "peak_gpu_bytes": peak_gpu, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "layers": per_layer,
    }
    if fam.moe:
        summary["moe"] = {"calibrate": cfg.options.get("moe_calibrate", "routed"),
                          "min_tokens": cfg.options.get("moe_min_tokens", DEFAULT_MIN_TOKENS),
                          "routed_tokens": expert_tokens, "fallback_rtn": list(fallback or []),
                          "full_precision": list(fam.full_precision)}
    (out / "qwen-quant-quantize.json").write_text(json.dumps(summary, indent=2))
    report = Report(extra={"quantize": summary})
    if cfg.validate:
        from qwen_quant.validate import run_eval

        report.results.append(run_eval(out, cfg.eval, reference=src, device=device, artifact_type=f"{cfg.method}-int{cfg.bits}"))
        report.write_json(out / "qwen-quant-report.json")
    return out, report
