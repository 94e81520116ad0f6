"""Validation: perplexity and parity of an artifact against a reference, on any backend.

`score` streams batches of evaluation windows through the artifact's backend and the reference's
in lockstep; logits stay on the device and only per-position scalars are kept (`metrics`).
`run_eval` is what `qwen-quant eval` and every quantizer/exporter call after writing an artifact:
it loads each model once, scores with whole models when reference + artifact fit the device(s) and
layer by layer (`streamed`) when they do not, decodes greedy parity in one batch, and records the
wall time per phase (load, scoring, greedy) and every choice it made (notes) in the `Result`.
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
    batch_size: int = 0  # windows per forward; 0: about 16k tokens on CUDA, 4k on the CPU

    def check(self) -> None:
        if self.method not in ("windows", "stride"):
            raise QuantError(f"unknown perplexity method {self.method!r}; use windows or stride")
        if self.ctx < 8:
            raise QuantError(f"--ctx {self.ctx} is too small; use at least 8 tokens")

    def windows_per_batch(self, device: str) -> int:
        if self.batch_size:
            return self.batch_size
        return max(1, (16384 if str(device).startswith("cuda") else 4096) // self.ctx)


def _sync(*backends) -> None:
    """Wait for the GPU so phase timings are real (kernels run asynchronously)."""
    import torch

    if torch.cuda.is_available() and any(b is not None and "cuda" in str(b.device) for b in backends):
        torch.cuda.synchronize()


def score(backend: Backend, tokens: np.ndarray, cfg: EvalConfig, reference: Backend | None = None) -> dict:
    """Teacher-forced metrics of ``backend`` (and parity with ``reference``), computed on the device.

    Windows go through the model(s) in batches; only the scored positions are projected to the
    vocabulary; per-position NLL/KL/top-1 stay on the device until the end.
    """
    import torch

    cfg.check()
    wins = windows(len(tokens), cfg.ctx, cfg.method, cfg.stride)
    if not wins:
        raise QuantError(f"the evaluation text has {len(tokens)} tokens, fewer than --ctx {cfg.ctx}; lower --ctx or give a longer text")
    acc = Accumulator()
    scored = sum(cfg.ctx - 1 - w.score_from for w in wins)
    bs = cfg.windows_per_batch(backend.device)
    with progress(f"eval {backend.name}", total=scored, unit="tokens") as advance:
        for b in range(0, len(wins), bs):
            batch = wins[b:b + bs]
            ids = np.stack([tokens[w.start:w.start + cfg.ctx] for w in batch]).astype(np.int64)
            keep = cfg.ctx - min(w.score_from for w in batch)  # positions ctx-keep .. ctx-1
            lg = backend.device_logits(ids, keep)
            rl = reference.device_logits(ids, keep) if reference is not None else None
            tg = torch.from_numpy(ids).to(lg.device)
            for i, w in enumerate(batch):
                pos = slice(w.score_from - (cfg.ctx - keep), keep - 1)
                advance(acc.add(lg[i, pos], tg[i, w.score_from + 1:], None if rl is None else rl[i, pos]))
            del lg, rl
    return acc.result()


def greedy(backend: Backend, prompts: Sequence[Sequence[int]], cfg: EvalConfig) -> list[list[int]]:
    """``cfg.greedy_tokens`` greedy tokens per prompt (the first ``cfg.max_prompts`` prompts)."""
    prompts = list(prompts)[: cfg.max_prompts]
    with progress(f"greedy {backend.name}", total=len(prompts), unit="prompts") as advance:
        out = backend.greedy_batch(prompts, cfg.greedy_tokens)
        advance(len(prompts))
    return out


def evaluate(backend: Backend, tokens: np.ndarray, cfg: EvalConfig, reference: Backend | None = None,
             prompts: Sequence[Sequence[int]] = (), phases: dict | None = None,
             ref_greedy=None) -> dict:
    """Perplexity of ``backend`` on ``tokens`` and, with a reference, KL/top-1/greedy parity.

    ``phases`` (if given) gets wall seconds for "scoring" and "greedy"; ``ref_greedy``: the
    reference's greedy tokens when already known, or a function returning them (a `run` decodes the
    reference once).
    """
    phases = {} if phases is None else phases
    t0 = time.perf_counter()
    m = score(backend, tokens, cfg, reference)
    _sync(backend, reference)
    phases["scoring"] = round(time.perf_counter() - t0, 3)
    if reference is not None and prompts and cfg.greedy_tokens > 0:
        t0 = time.perf_counter()
        ref = ref_greedy() if callable(ref_greedy) else ref_greedy
        ref = greedy(reference, prompts, cfg) if ref is None else ref
        m.update(greedy_parity(greedy(backend, prompts, cfg), ref))
        phases["greedy"] = round(time.perf_counter() - t0, 3)
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
    from qwen_quant.models.loader import load_text_config

    return load_text_config(path).get("max_position_embeddings")


def artifact_record(artifact, kind_hint: str | None = None, type_: str | None = None) -> dict:
    p = Path(artifact)
    if p.is_dir():
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    else:
        size = p.stat().st_size if p.exists() else None
    fmt = kind_hint or artifact_kind(p)
    if fmt == "hf" and p.is_dir() and (p / "config.json").exists():
        from qwen_quant.models.loader import load_text_config

        qc = load_text_config(p).get("quantization_config") or {}
        fmt = qc.get("quant_method") or "hf"
        from qwen_quant.formats.fp8 import is_fp8, scheme_of

        if type_ is None and is_fp8(qc):  # the artifact class check's fp8 defaults apply to
            type_ = "fp8-block" if scheme_of(qc)[0] else "fp8-dynamic"
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


class References:
    """The reference models of one report, each loaded once, and their greedy tokens, decoded once.

    `qwen-quant run` validates every artifact against the same reference: it keeps the reference
    backend open across artifacts (per device and dtype) and reuses its greedy tokens. KL needs the
    reference's full distribution at every scored position (48k x 152k values for a 7B eval: 15 GB in
    bf16), which is too large to cache on disk or host in general, so the reference's forward is run
    again per artifact (keeping it loaded is the cheaper half); its greedy tokens are small and cached.
    """

    def __init__(self):
        self.backends: dict[tuple, Backend] = {}
        self.tokens: dict[tuple, list[list[int]]] = {}

    def get(self, path, device: str, dtype: str | None) -> tuple[Backend, bool]:
        """(backend, was it already open)."""
        key = (str(path), device, dtype)
        if key in self.backends:
            return self.backends[key], True
        self.backends[key] = open_backend(path, None, device=device, dtype=dtype)
        return self.backends[key], False

    def loaded(self, path) -> bool:
        return any(k[0] == str(path) for k in self.backends)

    def greedy(self, key: tuple, decode) -> list[list[int]]:
        if key not in self.tokens:
            self.tokens[key] = decode()
        return self.tokens[key]

    def close(self) -> None:
        for b in self.backends.values():
            b.close()
        self.backends.clear()


def _work_bytes(cfg: EvalConfig, reference, device: str) -> int:
    """Activation memory of whole-model scoring: both models' logits of a batch plus metric temporaries."""
    from qwen_quant.models.loader import load_text_config
    from qwen_quant.validate.metrics import CHUNK_BYTES

    c = load_text_config(reference)
    bs, keep = cfg.windows_per_batch(device), cfg.ctx - cfg.ctx // 2
    return bs * keep * c["vocab_size"] * 2 * 2 + 4 * CHUNK_BYTES + bs * cfg.ctx * (c.get("intermediate_size") or c.get("moe_intermediate_size") or 0) * 8 + 2**30


def _streamable(artifact, reference, backend: str | None) -> bool:
    return (reference is not None and isinstance(artifact, (str, Path)) and artifact_kind(artifact) == "hf"
            and artifact_kind(reference) == "hf" and backend in (None, "torch"))


def run_eval(artifact, cfg: EvalConfig, reference=None, backend: str | None = None, device: str = "auto",
             dtype: str | None = None, ref_device: str | None = None, ref_dtype: str | None = None,
             tokenizer=None, artifact_type: str | None = None, streamed: bool | None = None,
             refs: References | None = None) -> Result:
    """Open the artifact (and reference), measure, close, and return one report `Result`.

    ``streamed``: None picks layer-streamed scoring by itself when reference + artifact do not fit
    the device(s) (and says so in the result's notes); True/False force it. ``refs``: reference
    models shared by the results of one report (`qwen-quant run`); a private one otherwise.
    """
    from qwen_quant.calib import dataset_fingerprint, eval_tokens, greedy_prompts
    from qwen_quant.models.loader import torch_dtype

    cfg.check()
    _check_inputs(artifact, reference)
    limit = context_limit(reference) or context_limit(artifact)
    if limit and cfg.ctx > limit:
        raise QuantError(f"--ctx {cfg.ctx} is larger than the model's context ({limit} tokens); lower --ctx")
    tok = tokenizer_for(artifact, reference, tokenizer)
    tokens = np.asarray(eval_tokens(tok, cfg.data, max_tokens=cfg.max_tokens), dtype=np.int64)
    prompts = [ids for _, ids in greedy_prompts(tok)][: cfg.max_prompts] if reference is not None else []
    t0 = time.perf_counter()
    phases: dict[str, float] = {}
    notes: list[str] = []
    own_refs = refs is None
    refs = refs or References()
    test_b = ref_b = None
    try:
        mode = (False, "together", [])
        if _streamable(artifact, reference, backend) and (ref_device is None or ref_device == device):
            from qwen_quant.devices import torch_devices
            from qwen_quant.validate.streamed import plan

            devices = torch_devices(device)
            dt = torch_dtype(dtype, devices[0])
            mode = plan(reference, devices, dt.itemsize, _work_bytes(cfg, reference, devices[0]), streamed,
                        cached_ref=refs.loaded(reference))
            notes += mode[2]
        if mode[0]:
            metrics, backend_rec, ref_rec = _run_streamed(artifact, reference, tokens, prompts, cfg, devices, dt,
                                                          mode[1], phases, refs)
        else:
            tl = time.perf_counter()
            test_b = open_backend(artifact, backend, device=device, dtype=dtype)
            if reference is not None:
                rdev = ref_device or test_b.device
                rdt = ref_dtype or ("float32" if rdev == "cpu" else "bfloat16")
                ref_b, cached = refs.get(reference, rdev, rdt)
                if cached:
                    notes.append("reference: loaded once for this report and reused")
                if ref_b.vocab_size and test_b.vocab_size and ref_b.vocab_size != test_b.vocab_size:
                    raise QuantError(f"artifact vocab {test_b.vocab_size} differs from reference vocab {ref_b.vocab_size}; "
                                     "is the reference the model this artifact was made from?")
            phases["load"] = round(time.perf_counter() - tl, 3)
            key = (str(reference), ref_b.device if ref_b else None, ref_b.dtype if ref_b else None, cfg.greedy_tokens, len(prompts))
            metrics = evaluate(test_b, tokens, cfg, ref_b, prompts, phases,
                               ref_greedy=lambda: refs.greedy(key, lambda: greedy(ref_b, prompts, cfg)))
            backend_rec = backend_record(test_b)
            ref_rec = None if ref_b is None else {"path": str(reference), "backend": ref_b.name, "device": ref_b.device, "dtype": ref_b.dtype}
        # artifact metadata parity (tokenizer, special ids, template, rope/eps/ctx): validate/metadata.py
        engine = getattr(test_b, "engine_view", None) if test_b is not None else None  # vLLM: what the engine parsed
        metadata = metadata_parity(artifact, reference, cfg.data, tok, engine=engine) if reference is not None and isinstance(artifact, (str, Path)) else None
        result = Result(
            metadata=metadata,
            artifact=artifact_record(artifact, type_=artifact_type),
            backend=backend_rec, reference=ref_rec,
            dataset={"name": cfg.data, "sha256": dataset_fingerprint(tokens), "n_tokens": int(len(tokens))},
            ctx=cfg.ctx, ppl_method=cfg.method, metrics=metrics, wall_time_s=round(time.perf_counter() - t0, 3),
            phases=phases, notes=notes,
        )
        # fp16 runs: reference activation peaks + fp16 parity on chat prompts: validate/overflow.py
        if test_b is not None and ref_b is not None:
            from qwen_quant.validate.overflow import annotate_fp16

            annotate_fp16(result, test_b, ref_b, tok)
        return result
    finally:
        if test_b is not None:
            test_b.close()
        if own_refs:
            refs.close()


def _run_streamed(artifact, reference, tokens, prompts, cfg: EvalConfig, devices: list[str], dt, greedy_mode: str,
                  phases: dict, refs: References):
    """Layer-streamed scoring, then greedy parity with whole models one at a time (or a skip note)."""
    import torch

    from qwen_quant.validate.streamed import evaluate_streamed

    refs.close()  # the device memory goes to the streamed layers
    metrics = evaluate_streamed(artifact, reference, tokens, cfg, device=devices[0], dtype=dt, phases=phases)
    dname = str(dt).replace("torch.", "")
    where = ",".join(devices)
    if prompts and cfg.greedy_tokens > 0 and greedy_mode == "sequential":
        t = time.perf_counter()
        decoded = []
        for path in (reference, artifact):
            with open_backend(path, "torch", device=where, dtype=dname) as b:
                decoded.append(greedy(b, prompts, cfg))
        metrics.update(greedy_parity(decoded[1], decoded[0]))
        phases["greedy"] = round(time.perf_counter() - t, 3)
    versions = {"torch": torch.__version__}
    if devices[0].startswith("cuda"):
        versions["gpu"] = torch.cuda.get_device_name(torch.device(devices[0]))
    backend_rec = {"name": "torch-streamed", "device": devices[0], "dtype": dname, "versions": versions}
    ref_rec = {"path": str(reference), "backend": "torch-streamed", "device": devices[0], "dtype": dname}
    return metrics, backend_rec, ref_rec


__all__ = ["EvalConfig", "References", "evaluate", "greedy", "run_eval", "score", "tokenizer_for"]
