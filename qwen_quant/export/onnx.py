"""Export a Qwen2 checkpoint to ONNX with a KV cache, the layout optimum and onnxruntime-genai use.

Inputs ``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.N.key/value``; outputs
``logits``, ``present.N.key/value``; axes ``batch``, ``sequence_length``, ``past_sequence_length``,
``total_sequence_length`` are dynamic. The first step feeds past tensors of length 0.

Why this route: optimum's exporter pins transformers < 4.58, so we call
``torch.onnx.export(dynamo=True)`` ourselves. transformers 5 keeps the cache in a ``DynamicCache``
object, which the exporter cannot take as a graph input; `KVCacheWrapper` takes flat past tensors,
builds the DynamicCache inside ``forward`` and returns flat presents, so the cache object never
crosses the graph boundary. The example inputs use batch 2, sequence 5, past 3 because torch.export
specialises sizes 0 and 1; the exported graph still runs with past length 0 (tested).

A GPTQ, AWQ or compressed-tensors W4A16 checkpoint is exported through its dequantized dense model and
each quantized linear's MatMul then becomes a MatMulNBits holding the checkpoint's own codes
(`onnx_nbits`); such an export is validated against ``reference``, else the full-precision model named
in the checkpoint's qwen-quant-quantize.json, else the dequantized checkpoint itself.

Post-processing is done on the ONNX protobuf (axis renames, int4 in `onnx_quant`, genai files in
`onnx_genai`), then the model is saved into a temporary folder that is renamed into place at the end.
Weights go to an external ``model.onnx.data`` file when they exceed ``external_data_threshold`` bytes
(protobuf caps one file at 2 GiB; the default 1 GiB threshold leaves room for the graph).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from qwen_quant.errors import QuantError
from qwen_quant.progress import log

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
EXTERNAL_DATA_THRESHOLD = 1 << 30
# torch.export specialises dims of size 0/1, so trace with sizes that are neither.
_EXAMPLE_BATCH, _EXAMPLE_SEQ, _EXAMPLE_PAST = 2, 5, 3


@dataclass
class OnnxExportConfig:
    """Everything `qwen-quant export onnx` takes; recipes fill the same fields."""

    model: str
    output: str | None = None  # default: <model>-onnx[-fp16][-int4]
    fp16: bool = False
    int4: bool = False
    block_size: int = 32
    symmetric: bool = True
    int4_embeddings: bool = True  # GatherBlockQuantized for the token embedding, when ORT has it
    int8: bool = False
    accuracy_level: int | None = None  # MatMulNBits compute: None/0 = float, 4 = int8 activations (faster on CPU)
    force: bool = False
    validate: bool = True
    json: str | None = None
    opset: int = 18
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD
    eval_ctx: int = 256
    eval_max_tokens: int | None = 4096
    reference: str | None = None  # validate against this model; default: the source a quantized checkpoint names

    def check(self) -> None:
        if self.int4 and self.int8:
            raise QuantError("--int4 and --int8 exclude each other; pick one")
        if self.int4 and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise QuantError(f"--block-size {self.block_size} is not supported; use a power of two >= 16 (32, 64, 128)")

    def default_output(self) -> Path:
        """<model>-onnx[-fp16][-int4|-int8] next to a local model; in the current folder for a hub id."""
        suffix = "-onnx" + ("-fp16" if self.fp16 else "") + ("-int4" if self.int4 else "") + ("-int8" if self.int8 else "")
        src = Path(self.model).expanduser()
        base = src.resolve() if src.exists() else Path.cwd() / src.name
        return base.with_name(base.name + suffix)


def input_names(n_layers: int) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def output_names(n_layers: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def _wrapper_class():
    import torch
    from transformers import DynamicCache

    class KVCacheWrapper(torch.nn.Module):
        """Flat tensors in, flat tensors out: the DynamicCache lives only inside ``forward``."""

        def __init__(self, model):
            super().__init__()
            self.model = model
            self.n_layers = model.config.num_hidden_layers
            # transformers 5.2x renamed the forward kwarg past_key_values -> cache; accept both.
            params = inspect.signature(model.forward).parameters
            self.cache_kw = "cache" if "cache" in params else "past_key_values"

        def forward(self, input_ids, attention_mask, position_ids, past):
            cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.n_layers)])
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, **{self.cache_kw: cache})
            new_cache = getattr(out, "cache", None)
            new_cache = out.past_key_values if new_cache is None else new_cache
            presents = []
            for layer in new_cache.layers:
                presents += [layer.keys, layer.values]
            return (out.logits, *presents)

    return KVCacheWrapper


def example_inputs(config, dtype):
    """Inputs for tracing, and the dynamic-shape spec that matches them."""
    import torch
    from torch.export import Dim

    n_layers = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    b, s, p = _EXAMPLE_BATCH, _EXAMPLE_SEQ, _EXAMPLE_PAST
    ids = torch.randint(0, config.vocab_size, (b, s))
    mask = torch.ones(b, p + s, dtype=torch.int64)
    pos = torch.arange(p, p + s).unsqueeze(0).expand(b, s).contiguous()
    past = [torch.zeros(b, config.num_key_value_heads, p, head_dim, dtype=dtype) for _ in range(2 * n_layers)]
    batch, seq, past_len = Dim("batch"), Dim("sequence_length"), Dim("past_sequence_length")
    dyn = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: Dim.AUTO},
           "position_ids": {0: batch, 1: seq}, "past": [{0: batch, 2: past_len} for _ in range(2 * n_layers)]}
    return (ids, mask, pos, past), dyn


def torch_to_onnx(model, opset: int = 18):
    """The model (eval, on CPU) as an ONNX ModelProto with the KV-cache interface."""
    import torch

    cfg = model.config
    args, dyn = example_inputs(cfg, next(model.parameters()).dtype)
    wrapper = _wrapper_class()(model).eval()
    n = cfg.num_hidden_layers
    # The exporter prints its steps on stdout; keep stdout clean for --json -.
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(wrapper, args, dynamo=True, dynamic_shapes=dyn, opset_version=opset,
                                 input_names=input_names(n), output_names=output_names(n), optimize=True,
                                 verbose=False)
    proto = prog.model_proto
    rename_total_axis(proto)
    return proto


def rename_total_axis(proto) -> None:
    """Give the past+new axis the name users know (the exporter calls it s53 or 'past + seq')."""
    graph = proto.graph
    mask = next(i for i in graph.input if i.name == "attention_mask")
    auto_name = mask.type.tensor_type.shape.dim[1].dim_param
    for vi in list(graph.input) + list(graph.output):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param and (d.dim_param == auto_name or d.dim_param.replace(" ", "") == "past_sequence_length+sequence_length"):
                d.dim_param = "total_sequence_length"


def initializer_bytes(proto) -> int:
    from onnx import helper

    total = 0
    for t in proto.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        total += n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize if t.data_type not in (21, 22) else (n + 1) // 2
    return total


def save_model(proto, folder: Path, external_threshold: int) -> bool:
    """Write model.onnx (+ model.onnx.data when big); returns whether external data was used."""
    import onnx

    external = initializer_bytes(proto) > external_threshold
    target = folder / MODEL_FILE
    if external:
        onnx.save_model(proto, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024, convert_attribute=False)
    else:
        onnx.save_model(proto, str(target))
    return external


def _load_hf(model_dir: Path, fp16: bool):
    from qwen_quant.models.loader import load_model

    model = load_model(model_dir, "cpu", "float16" if fp16 else "float32")
    model.set_attn_implementation("sdpa")
    model.config.use_cache = True
    return model


def export_onnx(cfg: OnnxExportConfig) -> Path:
    """Export, optionally quantize, write genai/tokenizer files, validate; returns the output folder."""
    from qwen_quant.export.onnx_genai import write_runtime_files
    from qwen_quant.models.loader import check_model

    cfg.check()
    src, hf_cfg, family = check_model(cfg.model)
    if family.onnx_type is None:
        raise QuantError(f"{src}: {family.description} has no ONNX export: {family.onnx_hint or 'onnxruntime-genai has no model type for it'}")
    codes = _checkpoint_codes(src, hf_cfg, cfg)
    out = Path(cfg.output).expanduser() if cfg.output else cfg.default_output()
    if out.exists() and not cfg.force:
        raise QuantError(f"{out} already exists; pass --force to overwrite it or choose another -o")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    t0 = time.perf_counter()
    nbits = None
    try:
        log(f"exporting {src} to ONNX ({'fp16' if cfg.fp16 else 'fp32'})")
        model = _load_hf(src, cfg.fp16)
        if codes is not None:
            _set_exact_weights(model, codes, src)
        proto = torch_to_onnx(model, cfg.opset)
        del model
        if codes is not None:
            nbits = _use_checkpoint_codes(proto, codes, hf_cfg, cfg)
        else:
            proto = _quantize(proto, cfg)
        external = save_model(proto, tmp, cfg.external_data_threshold)
        del proto
        write_runtime_files(src, tmp, hf_cfg, MODEL_FILE)
        meta = {"source": str(src), "export": {k: v for k, v in asdict(cfg).items() if k not in ("json",)},
                "external_data": external, "export_seconds": round(time.perf_counter() - t0, 2)}
        if nbits is not None:
            meta["checkpoint_codes"] = nbits
        (tmp / "qwen_quant_export.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out}")
    if cfg.validate or cfg.json:
        ref, why = _reference(src, cfg, codes is not None)
        if codes is not None:
            log(f"validating against {ref} ({why})")
        _validate(out, ref, cfg, nbits, why)
    return out


def _checkpoint_codes(src: Path, hf_cfg: dict, cfg: OnnxExportConfig):
    """The checkpoint's own 4-bit codes per linear when it is a GPTQ/AWQ/compressed-tensors checkpoint, else None."""
    from qwen_quant.export import onnx_nbits

    if not onnx_nbits.quant_method(hf_cfg):
        if cfg.reference:
            from qwen_quant.models.loader import resolve_model

            resolve_model(cfg.reference)
        return None
    if cfg.int4 or cfg.int8:
        raise QuantError(f"{src} is already quantized; drop --int4/--int8 (its own codes are exported as MatMulNBits), "
                         "or export the full-precision source to re-quantize")
    codes = onnx_nbits.read_codes(src, hf_cfg)
    onnx_nbits.check_codes(codes)
    if cfg.reference:
        from qwen_quant.models.loader import resolve_model

        resolve_model(cfg.reference)
    return codes


def _set_exact_weights(model, codes, src: Path) -> None:
    """Give each quantized linear exactly ``scale * (code - zero)`` in the export dtype, so its MatMul in
    the graph is found by the hash of those bytes whatever dequantizing loader built the model."""
    import torch

    dtype = next(model.parameters()).dtype
    for name, lc in codes.items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise QuantError(f"{src}: quantized linear {name} is not a module of the model; the checkpoint is damaged") from None
        w = lc.dequant().to(dtype)
        if tuple(lin.weight.shape) != tuple(w.shape):
            raise QuantError(f"{src}: {name} has codes of shape {tuple(w.shape)} but the model expects "
                             f"{tuple(lin.weight.shape)}; the checkpoint is damaged, re-create it")
        with torch.no_grad():
            lin.weight = torch.nn.Parameter(w.contiguous(), requires_grad=False)


def _use_checkpoint_codes(proto, codes, hf_cfg: dict, cfg: OnnxExportConfig) -> dict:
    import numpy as np

    from qwen_quant.export import onnx_nbits
    from qwen_quant.export.onnx_quant import summary

    method = onnx_nbits.quant_method(hf_cfg)
    done = onnx_nbits.replace_matmuls(proto, codes, np.float16 if cfg.fp16 else np.float32, cfg.accuracy_level)
    ops = summary(proto)
    sizes = sorted({lc.group_size for lc in codes.values()})
    act_order = sum(lc.g_idx is not None for lc in codes.values())
    info = {"method": method, "codes": "checkpoint", "bits": 4, "group_size": sizes[0] if len(sizes) == 1 else sizes,
            "quantized_linears": len(codes), "matmulnbits": len(done), "act_order_linears": act_order,
            "float_matmuls": ops.get("MatMul", 0)}
    log(f"{len(done)} of {len(codes)} quantized linears became MatMulNBits with the checkpoint's own {method} codes "
        f"(group {info['group_size']}{', act-order' if act_order else ''}); {info['float_matmuls']} MatMul stay float")
    return info


def _reference(src: Path, cfg: OnnxExportConfig, quantized: bool) -> tuple[Path, str]:
    """What the export is validated against, and why that model."""
    from qwen_quant.export.onnx_nbits import source_of
    from qwen_quant.models.loader import resolve_model

    if cfg.reference:
        return resolve_model(cfg.reference), "--reference"
    if not quantized:
        return src, "the exported model"
    named = source_of(src)
    if named:
        return Path(named), "the full-precision source named in qwen-quant-quantize.json"
    return src, "the dequantized checkpoint itself (no source recorded; pass --reference to compare with the original)"


def _quantize(proto, cfg: OnnxExportConfig):
    if not (cfg.int4 or cfg.int8):
        return proto
    from qwen_quant.export import onnx_quant

    if cfg.int4:
        log(f"int4 weight-only (MatMulNBits, block {cfg.block_size}, {'sym' if cfg.symmetric else 'asym'})")
        return onnx_quant.quantize_int4(proto, cfg.block_size, cfg.symmetric, embeddings=cfg.int4_embeddings,
                                          accuracy_level=cfg.accuracy_level)
    log("int8 dynamic quantization of MatMul weights")
    return onnx_quant.quantize_int8(proto)


def _validate(out: Path, src: Path, cfg: OnnxExportConfig, nbits: dict | None = None, why: str = "") -> None:
    """Perplexity + parity of the ONNX folder against ``src`` (the reference model)."""
    try:
        from qwen_quant.report import Report, emit
        from qwen_quant.validate import EvalConfig, run_eval
    except ImportError as err:  # validation modules missing from a partial install
        raise QuantError(f"validation is unavailable ({err}); rerun with --no-validate") from None
    ecfg = EvalConfig(ctx=cfg.eval_ctx, max_tokens=cfg.eval_max_tokens)
    kind = "onnx-" + ("int4" if cfg.int4 else "int8" if cfg.int8 else "fp16" if cfg.fp16 else "fp32")
    if nbits is not None:
        kind = f"onnx-int4-{nbits['method']}" + ("-fp16" if cfg.fp16 else "")
    result = run_eval(out, ecfg, reference=src, backend="onnxruntime", device="auto", ref_device="cpu",
                      artifact_type=kind)
    extra = {} if nbits is None else {"export": {"checkpoint_codes": nbits, "reference": str(src), "reference_is": why}}
    report = Report(results=[result], extra=extra)
    emit(report, cfg.json, f"ONNX export {out.name}")
