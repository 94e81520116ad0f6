"""`qwen-quant export gguf`: one float GGUF, then every requested llama.cpp type from it, then validation.

All quantized types are made from the same float intermediate (like running llama-quantize several
times on one convert_hf_to_gguf.py output), so they differ only in the quantizer. The intermediate is
kept when its own type was asked for, else deleted. Every file is written under a temporary name and
renamed when complete, so an interrupted run never leaves a truncated file under the final name.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qwen_quant.errors import QuantError
from qwen_quant.export.gguf import write_float_gguf
from qwen_quant.export.gguf_quant import FLOAT_TYPES, parse_types, quantize_gguf
from qwen_quant.progress import log

#: Texts for the llama.cpp-vs-HF tokenizer check run on every export (ASCII, CJK, code, ChatML).
TOKENIZER_CHECK_TEXTS = (
    "Hello world! This is a test of the GGUF export.",
    "我想在apple工作1314151天～ нещо на Български",
    "def f(x):\n    return x ** 2  # 🦙\n\n\n",
    "<|im_start|>user\nhi<|im_end|>",
)


@dataclass
class GGUFExportConfig:
    """Everything `qwen-quant export gguf` takes; recipes fill the same fields."""

    model: str
    types: list[str] | str = "q4_k_m"
    outdir: str | None = None  # default: <model>-gguf next to the model (hub id: in the current folder)
    outtype: str = "f16"  # float intermediate: f16, bf16, f32
    imatrix: bool = False
    calib: str = "shipped"
    nsamples: int = 64
    seqlen: int = 512
    force: bool = False
    validate: bool = True
    json: str | None = None
    eval_ctx: int = 256
    eval_max_tokens: int | None = 4096
    nthread: int = 0

    def check(self) -> list[str]:
        if self.outtype not in FLOAT_TYPES:
            raise QuantError(f"unknown --outtype {self.outtype!r}; choose one of {', '.join(FLOAT_TYPES)}")
        return parse_types(self.types)


def output_paths(name: str, outdir: Path, types: list[str]) -> dict[str, Path]:
    return {t: outdir / f"{name}-{t}.gguf" for t in types}


def export_gguf(cfg: GGUFExportConfig, validator: Callable[[Path, str], dict] | None = None) -> list[Path]:
    """Write ``OUTDIR/<name>-<type>.gguf`` for every type; returns the paths in the order asked.

    ``validator(path, type)`` replaces the default validation (``qwen_quant.validate.run_eval``
    against the source checkpoint); it is called only when ``cfg.validate`` or ``cfg.json``.
    """
    from qwen_quant.models.loader import check_model

    types = cfg.check()
    src, _hf_cfg, _family = check_model(cfg.model)
    ref = Path(str(cfg.model).rstrip("/")).expanduser()  # name files after what the user typed, not a cache hash
    outdir = Path(cfg.outdir).expanduser() if cfg.outdir else ref.with_name(ref.name + "-gguf")
    outs = output_paths(ref.name, outdir, types)
    existing = [str(p) for p in outs.values() if p.exists()]
    if existing and not cfg.force:
        raise QuantError(f"{', '.join(existing)} already exist(s); pass --force to overwrite or choose another -o")
    outdir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    keep_float = cfg.outtype in outs
    inter = outs[cfg.outtype] if keep_float else outdir / f".{ref.name}-{cfg.outtype}.intermediate.gguf"
    try:
        log(f"writing {cfg.outtype} GGUF from {src}")
        write_float_gguf(src, inter, cfg.outtype)
        imatrix = _imatrix(src, cfg) if cfg.imatrix and any(t not in FLOAT_TYPES for t in types) else None
        for t in types:
            if t in FLOAT_TYPES and t != cfg.outtype:
                write_float_gguf(src, outs[t], t)
            elif t not in FLOAT_TYPES:
                log(f"quantizing to {t}{' with importance matrix' if imatrix else ''}")
                quantize_gguf(inter, outs[t], t, imatrix=imatrix, nthread=cfg.nthread)
    finally:
        if not keep_float:
            inter.unlink(missing_ok=True)
    log(f"wrote {', '.join(str(p) for p in outs.values())} in {time.perf_counter() - t0:.1f}s")
    if cfg.validate or cfg.json:
        _validate(outs, src, cfg, validator)
    return list(outs.values())


def _imatrix(src: Path, cfg: GGUFExportConfig) -> dict:
    from qwen_quant.calib import CalibConfig
    from qwen_quant.export.gguf_imatrix import imatrix_for_model
    from qwen_quant.models.loader import load_tokenizer

    log(f"importance matrix from {cfg.nsamples} x {cfg.seqlen} calibration tokens ({cfg.calib})")
    samples = CalibConfig(source=cfg.calib, nsamples=cfg.nsamples, seqlen=cfg.seqlen).samples(load_tokenizer(src))
    return imatrix_for_model(src, samples).values()


def _validate(outs: dict[str, Path], src: Path, cfg: GGUFExportConfig, validator) -> None:
    """Tokenizer agreement, then perplexity + parity of each file against the source checkpoint."""
    from qwen_quant.backends.llamacpp import check_tokenizer
    from qwen_quant.models.loader import load_tokenizer

    first = next(iter(outs.values()))
    check_tokenizer(first, load_tokenizer(src), TOKENIZER_CHECK_TEXTS)
    if validator is not None:
        for t, p in outs.items():
            validator(p, t)
        return
    try:
        from qwen_quant.report import Report, emit
        from qwen_quant.validate import EvalConfig, run_eval
    except ImportError as err:
        raise QuantError(f"validation is unavailable ({err}); rerun with --no-validate") from None
    ecfg = EvalConfig(ctx=cfg.eval_ctx, max_tokens=cfg.eval_max_tokens)
    report = Report(results=[run_eval(p, ecfg, reference=src, backend="llama.cpp", device="auto",
                                      ref_device="cpu", artifact_type=f"gguf-{t}") for t, p in outs.items()])
    emit(report, cfg.json, f"GGUF export {src.name}")
