"""Validation: perplexity and parity of an artifact against a reference, on any backend.

`evaluate` streams windows of the evaluation token stream through the artifact's backend (and the
reference's, in lockstep), so only one window of logits per backend is ever held in memory.
`run_eval` is what `qwen-quant eval` and every quantizer/exporter call after writing an artifact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from qwen_quant.backends import Backend, artifact_kind, open_backend
from qwen_quant.errors import QuantError
from qwen_quant.progress import progress
from qwen_quant.report import Result
from qwen_quant.validate.metrics import Accumulator, greedy_parity, windows
from qwen_quant.validate.metadata import metadata_parity


@dataclass
class EvalConfig:
    """How an artifact is measured; recipes and every CLI command fill the same fields."""

    ctx: int = 512
    method: str = "windows"  # "windows" (llama-perplexity) or "stride" (HF sliding window)
    stride: int | None = None
    data: str = "shipped"  # evaluation text source (see qwen_quant.calib)
    max_tokens: int | None = None  # cut the evaluation stream to this many tokens
    greedy_tokens: int = 32
    max_prompts: int | None = None
    batch_size: int = 1

    def check(self) -> None:
        if self.method not in ("windows", "stride"):
            raise QuantError(f"unknown perplexity method {self.method!r}; use windows or stride")
        if self.ctx < 8:
            raise QuantError(f"--ctx {self.ctx} is too small; use at least 8 tokens")


def evaluate(backend: Backend, tokens: np.ndarray, cfg: EvalConfig, reference: Backend | None = None,
             prompts: Sequence[Sequence[int]] = ()) -> dict:
    """Perplexity of ``backend`` on ``tokens`` and, with a reference, KL/top-1/greedy parity."""
    cfg.check()
    wins = windows(len(tokens), cfg.ctx, cfg.method, cfg.stride)
    if not wins:
        raise QuantError(f"the evaluation text has {len(tokens)} tokens, fewer than --ctx {cfg.ctx}; lower --ctx or give a longer text")
    acc, ref_acc = Accumulator(), Accumulator()
    scored = sum(cfg.ctx - 1 - w.score_from for w in wins)
    with progress(f"eval {backend.name}", total=scored, unit="tokens") as advance:
        for b in range(0, len(wins), cfg.batch_size):
            batch = wins[b:b + cfg.batch_size]
            ids = np.stack([tokens[w.start:w.start + cfg.ctx] for w in batch]).astype(np.int64)
            lg = backend.logits(ids)
            rl = reference.logits(ids) if reference is not None else None
            for i, w in enumerate(batch):
                pos = slice(w.score_from, cfg.ctx - 1)
                targets = ids[i, w.score_from + 1:]
                acc.add(lg[i, pos], targets, None if rl is None else rl[i, pos])
                if rl is not None:
                    ref_acc.add(rl[i, pos], targets)
                advance(len(targets))
    m = acc.result()
    if reference is not None:
        m["ref_perplexity"] = ref_acc.result()["perplexity"]
        m["ppl_ratio"] = m["perplexity"] / m["ref_perplexity"]
        if prompts and cfg.greedy_tokens > 0:
            prompts = list(prompts)[: cfg.max_prompts]
            with progress("greedy parity", total=len(prompts), unit="prompts") as advance:
                test, ref = [], []
                for p in prompts:
                    test.append(backend.greedy(p, cfg.greedy_tokens))
                    ref.append(reference.greedy(p, cfg.greedy_tokens))
                    advance()
            m.update(greedy_parity(test, ref))
    return m


def tokenizer_for(artifact: str | Path, reference: str | Path | None = None, tokenizer: str | Path | None = None):
    """The HF tokenizer that produces the ids every backend sees (explicit > reference > artifact)."""
    from qwen_quant.models.loader import load_tokenizer

    for cand in (tokenizer, reference):
        if cand is not None and artifact_kind(cand) == "hf":
            return load_tokenizer(cand)
    p = Path(artifact)
    if artifact_kind(p) == "gguf":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    return load_tokenizer(p.parent if p.suffix == ".onnx" else p)


def context_limit(path: str | Path | None) -> int | None:
    if path is None or artifact_kind(path) != "hf":
        return None
    from qwen_quant.models.loader import load_config

    return load_config(path).get("max_position_embeddings")


def artifact_record(artifact, kind_hint: str | None = None, type_: str | None = None) -> dict:
    p = Path(artifact)
    if p.is_dir():
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    else:
        size = p.stat().st_size if p.exists() else None
    fmt = kind_hint or artifact_kind(p)
    if fmt == "hf" and p.is_dir() and (p / "config.json").exists():
        from qwen_quant.models.loader import load_config

        fmt = (load_config(p).get("quantization_config") or {}).get("quant_method") or "hf"
    return {"path": str(p), "format": fmt, "type": type_, "size_bytes": size}


def backend_record(b: Backend) -> dict:
    return {"name": b.name, "device": b.device, "dtype": b.dtype, "versions": {k: str(v) for k, v in b.versions().items()}}


def _check_inputs(*paths) -> None:
    """Fail fast, with the registry's one-line errors, before anything heavy is loaded."""
    from qwen_quant.models.loader import check_model

    for p in paths:
        if p is None:
            continue
        if artifact_kind(p) == "hf":
            check_model(p)
        elif not Path(p).exists():
            raise QuantError(f"{p} does not exist; pass an existing .gguf file or ONNX folder")


def run_eval(artifact, cfg: EvalConfig, reference=None, backend: str | None = None, device: str = "auto",
             dtype: str | None = None, ref_device: str | None = None, ref_dtype: str | None = None,
             tokenizer=None, artifact_type: str | None = None) -> Result:
    """Open the artifact (and reference), measure, close, and return one report `Result`."""
    from qwen_quant.calib import dataset_fingerprint, eval_tokens, greedy_prompts

    cfg.check()
    _check_inputs(artifact, reference)
    limit = context_limit(reference) or context_limit(artifact)
    if limit and cfg.ctx > limit:
        raise QuantError(f"--ctx {cfg.ctx} is larger than the model's context ({limit} tokens); lower --ctx")
    tok = tokenizer_for(artifact, reference, tokenizer)
    tokens = np.asarray(eval_tokens(tok, cfg.data, max_tokens=cfg.max_tokens), dtype=np.int64)
    prompts = [ids for _, ids in greedy_prompts(tok)] if reference is not None else []
    t0 = time.perf_counter()
    test_b = open_backend(artifact, backend, device=device, dtype=dtype)
    ref_b = None
    try:
        if reference is not None:
            rdev = ref_device or test_b.device
            ref_b = open_backend(reference, None, device=rdev, dtype=ref_dtype or ("float32" if rdev == "cpu" else "bfloat16"))
            if ref_b.vocab_size and test_b.vocab_size and ref_b.vocab_size != test_b.vocab_size:
                raise QuantError(f"artifact vocab {test_b.vocab_size} differs from reference vocab {ref_b.vocab_size}; "
                                 "is the reference the model this artifact was made from?")
        metrics = evaluate(test_b, tokens, cfg, ref_b, prompts)
        # artifact metadata parity (tokenizer, special ids, template, rope/eps/ctx; issue 12): validate/metadata.py
        metadata = metadata_parity(artifact, reference, cfg.data) if reference is not None and isinstance(artifact, (str, Path)) else None
        return Result(
            metadata=metadata,
            artifact=artifact_record(artifact, type_=artifact_type),
            backend=backend_record(test_b),
            reference=None if ref_b is None else {"path": str(reference), "backend": ref_b.name, "device": ref_b.device, "dtype": ref_b.dtype},
            dataset={"name": cfg.data, "sha256": dataset_fingerprint(tokens), "n_tokens": int(len(tokens))},
            ctx=cfg.ctx, ppl_method=cfg.method, metrics=metrics, wall_time_s=round(time.perf_counter() - t0, 3),
        )
    finally:
        test_b.close()
        if ref_b is not None:
            ref_b.close()


__all__ = ["EvalConfig", "evaluate", "run_eval", "tokenizer_for"]
