"""FP8 e4m3 weights with no calibration: streamed from the shards, one decoder layer at a time.

Every linear the family lists for a decoder layer (experts of MoE layers included, each on disk) becomes
an fp8 weight with its scales (`qwen_quant.formats.fp8`); everything else -- embeddings, norms,
``lm_head`` and the family's full-precision modules (router, shared-expert gate) -- is copied in the
source dtype and named in ``modules_to_not_convert`` / ``ignore``, as Qwen's FP8 releases do. Nothing runs
the model forward, so a 72B checkpoint needs one layer of host (or GPU) memory at a time.

Formats: ``fp8`` (Qwen's ``quant_method: fp8``, ``weight_scale_inv``, 128 x 128 blocks) or
``compressed-tensors`` (``weight_scale``; scheme ``block`` = FP8_BLOCK, ``dynamic`` = FP8_DYNAMIC with
per-channel weights), the quantization_config built by the compressed-tensors library's presets.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwen_quant.errors import QuantError
from qwen_quant.formats import fp8 as F
from qwen_quant.formats.checkpoint import CheckpointWriter, WeightStore
from qwen_quant.report import Report


@dataclass
class FP8Config:
    model: str = ""
    output: str = ""
    format: str = "fp8"  # fp8 | compressed-tensors
    scheme: str = "block"  # block (128x128 weights, per-token-per-128 activations) | dynamic (per channel / per token)
    device: str = "auto"
    force: bool = False
    validate: bool = True
    eval: object = None  # validate.EvalConfig
    options: dict = field(default_factory=dict)

    def check(self) -> None:
        if self.format not in ("fp8", "compressed-tensors"):
            raise QuantError(f"--format {self.format!r} is not an FP8 format; use fp8 or compressed-tensors")
        if self.scheme not in ("block", "dynamic"):
            raise QuantError(f"--scheme {self.scheme!r} is unknown; use block (128x128) or dynamic (per channel)")
        if self.format == "fp8" and self.scheme != "block":
            raise QuantError("the fp8 format (Qwen's layout) is block-wise only; use --format compressed-tensors "
                             "for --scheme dynamic")

    @property
    def artifact_type(self) -> str:
        return f"fp8-{self.scheme}"


def quantize_tensor(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    return F.quantize_block(w) if scheme == "block" else F.quantize_channel(w)


def _layer_of(name: str, layers_path: str) -> int | None:
    if not name.startswith(layers_path + "."):
        return None
    return int(name[len(layers_path) + 1:].split(".", 1)[0])


def quantize_fp8(cfg: FP8Config) -> tuple[Path, Report]:
    from qwen_quant.devices import torch_device
    from qwen_quant.models.loader import check_model
    from qwen_quant.progress import log, progress

    cfg.check()
    src, hf, fam = check_model(cfg.model)
    if not fam.supported:
        raise QuantError(f"{src}: {fam.description} is recognised but not supported yet; {fam.hint}")
    if (hf.get("quantization_config") or {}).get("quant_method"):
        raise QuantError(f"{src} is already quantized ({hf['quantization_config']['quant_method']}); "
                         "pass the full-precision checkpoint")
    device = torch_device(cfg.device)
    store = WeightStore(src)
    writer = CheckpointWriter(cfg.output, force=cfg.force)
    sname = "weight_scale_inv" if cfg.format == "fp8" else "weight_scale"
    n_layers = int(hf["num_hidden_layers"])
    by_layer: dict[int | None, list[str]] = {}
    for name in store.where:
        by_layer.setdefault(_layer_of(name, fam.layers_path), []).append(name)
    t0 = time.perf_counter()
    ignore: list[str] = []
    per_layer, quantized = [], 0
    try:
        with progress("fp8", n_layers, "layers") as advance:
            for i in range(n_layers):
                t = time.perf_counter()
                prefix = f"{fam.layers_path}.{i}."
                linears = {prefix + n for g in fam.layer_groups(hf, i) for n in g}
                out: dict[str, torch.Tensor] = {}
                for name in by_layer.get(i, []):
                    base = name.rsplit(".", 1)[0]
                    w = store.get(name)
                    if base in linears and name.endswith(".weight") and w.dim() == 2:
                        q, s = quantize_tensor(w.to(device), cfg.scheme)
                        out[name], out[f"{base}.{sname}"] = q, s
                        quantized += 1
                    else:
                        out[name] = w
                        if base not in linears and base not in ignore:
                            ignore.append(base)
                missing = sorted(b for b in linears if f"{b}.weight" not in store)
                if missing:
                    raise QuantError(f"{src}: {missing[0]}.weight is not in the checkpoint; the weights do not "
                                     "match the family's layout (fused experts?), re-save it with transformers")
                writer.add(out)
                per_layer.append({"layer": i, "seconds": round(time.perf_counter() - t, 3)})
                advance(info=f"layer {i}: {per_layer[-1]['seconds']:.2f}s")
        for name in by_layer.get(None, []):
            writer.add({name: store.get(name)})
            base = name.rsplit(".", 1)[0]
            if base not in ignore:
                ignore.append(base)
        if hf.get("tie_word_embeddings") and fam.lm_head_path not in ignore:
            ignore.append(fam.lm_head_path)
        new_cfg = dict(hf)
        ignore = [fam.lm_head_path] + [m for m in ignore if m != fam.lm_head_path]
        new_cfg["quantization_config"] = (F.fp8_config(ignore) if cfg.format == "fp8"
                                          else F.ct_config(cfg.scheme, ignore))
        writer.finish(new_cfg, src)
    except BaseException:
        writer.abort()
        raise
    out_dir = Path(cfg.output)
    size = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    summary = {"method": "fp8", "format": cfg.format, "scheme": cfg.scheme, "bits": 8,
               "group_size": 128 if cfg.scheme == "block" else -1, "device": device, "linears": quantized,
               "size_before_bytes": sum(f.stat().st_size for f in Path(src).glob("*.safetensors")),
               "size_after_bytes": size, "seconds": round(time.perf_counter() - t0, 2),
               "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "layers": per_layer}
    (out_dir / "qwen-quant-quantize.json").write_text(json.dumps(summary, indent=2))
    log(f"[bold]fp8 {cfg.scheme}[/bold] ({cfg.format}) -> {out_dir}: {quantized} linears, "
        f"{summary['size_before_bytes'] / 2**20:.1f} MiB -> {size / 2**20:.1f} MiB, {summary['seconds']:.1f}s")
    report = Report(extra={"quantize": summary})
    if cfg.validate:
        from qwen_quant.validate import EvalConfig, run_eval

        report.results.append(run_eval(out_dir, cfg.eval or EvalConfig(), reference=src, device=device,
                                       artifact_type=cfg.artifact_type))
        report.write_json(out_dir / "qwen-quant-report.json")
    return out_dir, report
