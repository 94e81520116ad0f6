"""Benchmark: qwen-quant vs llm-compressor 0.14, GPTQ and AWQ, same shape and calibration ids, one call.

A few decoder layers of a real Qwen shape are built with random fp16 weights (speed and memory do not
depend on the values; quality is measured on trained fixtures elsewhere), one set of calibration
token ids is drawn from the shipped data, and each tool quantizes the same checkpoint from the same
ids in its own subprocess, so imports never mix (llm-compressor pins transformers <= 5.17 and
compressed-tensors 0.19: it runs with ``--peer-path`` first on PYTHONPATH) and each peak is its own.

Per tool and method: wall seconds of the quantization call (ours: `quantize_model`, including the
checkpoint write, less the tokenizer load, which the peer's timer leaves out too; theirs: `oneshot`,
no save), seconds per layer (that wall time / layers built, so
both carry their warm-up and fixed costs such as embeddings), steady seconds per layer (ours: the
mean layer time after the first; theirs: the mean interval between successive layers' compression
events, timed by wrapping ``LifecycleCallbacks.sequential_epoch_end``), peak GPU memory (``torch.cuda.max_memory_allocated``), and the full-depth
extrapolation. Ours also reports per-layer phases (load, quantize, forward, pack, to_host). On CUDA a
solve check compares our Triton column kernel with the eager loop on one 4096 x 4096 matrix.

    # GPU (see docs/benchmarks.md for the exact device command)
    python bench/quant_side_by_side.py --shape qwen1.5-7b --layers 3 --nsamples 128 --seqlen 2048 \\
        --large 512x2048 --peer-path /tmp/peer --out bench/results/side-by-side-qwen1.5-7b.json
    # CPU, about a minute: tiny shape, both tools, both methods
    python bench/quant_side_by_side.py --smoke --peer-path /tmp/i14-peer
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # name: (hidden, intermediate, heads, kv_heads, vocab, full depth)
    "qwen1.5-7b": (4096, 11008, 32, 32, 151936, 32),
    "qwen2-72b": (8192, 29568, 64, 8, 152064, 80),
    "tiny": (256, 768, 4, 2, 151936, 24),
}


def _peak(torch) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


# -- build (our side) ---------------------------------------------------------------------------
def build(shape: str, layers: int, out: Path, device: str) -> Path:
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwen_quant.calib import default_tokenizer_dir

    h, inter, heads, kv, vocab, _ = SHAPES[shape]
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=32768,
                      rope_theta=1e6, tie_word_embeddings=False, dtype="float16")
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    # GPT-2-style init (as bench/llamacpp_cuda.py): linears N(0, 0.02), the residual-writing o_proj and
    # down_proj scaled by 1/sqrt(2 x depth), unit-variance embeddings, norms 1, biases N(0, 0.01). With
    # all linears at 0.02 a 7B MLP's output has RMS ~2 and its int4 error RMS ~0.4, and llm-compressor's
    # AWQ loss, ``mse_loss(..., reduction="sum")`` per fp16 batch of 2048 x 4096 values, overflows fp16
    # (~1.2e6 > 65504): every grid point is inf and it stops ("No finite loss ..."). With this init the
    # sum is ~1.9e4 (7B) and ~4e4 (72B layer) per sample; `activations` in the JSON records the forward.
    depth = SHAPES[shape][5]
    g = torch.Generator(device=device).manual_seed(0)
    sd = {}
    for k, v in model.state_dict().items():
        std = 1.0 if k.endswith("embed_tokens.weight") else 0.01 if v.dim() == 1 else \
            0.02 / math.sqrt(2 * depth) if k.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
        t = torch.randn(v.shape, device=device, generator=g, dtype=torch.float32) * std
        sd[k] = (torch.ones_like(t) if k.endswith("norm.weight") else t).half().cpu()
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(str(out))
    tok = default_tokenizer_dir()
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "vocab.json", "merges.txt"):
        if (tok / f).exists():
            shutil.copy(tok / f, out / f)
    return out


def check_finite(model_dir: Path, ids, device: str, dtype) -> dict:
    """Forward of the built model (HF, ``dtype``) on 4 calibration samples: per-layer hidden-state
    RMS and max |x|, and whether everything stayed finite (the peer's AWQ search runs this in fp16)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    x = torch.as_tensor(ids[:4]).to(device)
    with torch.no_grad():
        hs = model(x, output_hidden_states=True).hidden_states
    out = {"dtype": str(dtype), "finite": all(bool(torch.isfinite(h).all()) for h in hs),
           "rms": [round(float(h.float().pow(2).mean().sqrt()), 3) for h in hs],
           "max_abs": [round(float(h.float().abs().max()), 2) for h in hs]}
    del model, hs
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


# -- the two sides (each in its own subprocess) --------------------------------------------------
def peer_side(method: str, model_dir: str, calib: str, device: str) -> dict:
    import numpy as np
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    patches = []
    if not torch.accelerator.is_available():  # see bench/peer_llmcompressor.py: pinning needs an accelerator
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *a, **k: None
        patches.append("IntermediatesCache.pin_memory -> no-op (CPU-only torch)")
    ids = np.load(calib)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist()})
    if method == "gptq":
        recipe = [GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"], dampening_frac=0.01,
                               actorder=None, block_size=128)]
    else:
        recipe = [AWQModifier(duo_scaling=True, n_grid=20),
                  QuantizationModifier(targets="Linear", scheme="W4A16_ASYM", ignore=["lm_head"])]
    dtype = getattr(torch, os.environ.get("SBS_PEER_DTYPE") or ("float16" if device == "cuda" else "float32"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(model_dir)
    # a timestamp at each subgraph's compression (one subgraph per decoder layer, then the tail):
    # the intervals between them are llm-compressor's steady per-layer time, without fixed costs
    from llmcompressor.core import LifecycleCallbacks

    marks, epoch_end = [], LifecycleCallbacks.sequential_epoch_end

    def mark(*args, **kwargs):
        out = epoch_end(*args, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
        return out

    LifecycleCallbacks.sequential_epoch_end = mark
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    oneshot(model=model, processor=tok, dataset=ds, recipe=recipe, num_calibration_samples=len(ids),
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    import llmcompressor

    gaps = [round(b - a, 3) for a, b in zip(marks, marks[1:])]
    layers = model.config.num_hidden_layers
    return {"seconds": round(seconds, 2), "peak_gpu_gib": _peak(torch), "recipe": [repr(m) for m in recipe],
            "epoch_end_intervals_s": gaps,
            # intervals between layer subgraphs (the first layer's interval starts after its own epoch end)
            "steady_seconds_per_layer": round(sum(gaps[:layers - 1]) / max(1, len(gaps[:layers - 1])), 3) if gaps else None,
            "patches": patches, "version": llmcompressor.__version__, "dtype": str(dtype),
            "note": "oneshot wall time (sequential pipeline; model on the CPU, each layer onloaded); no save"}


def solve_check() -> dict:
    """Triton column kernel vs the eager loop on one random 4096 x 4096 solve (CUDA only)."""
    import torch

    from qwen_quant.quantize import gptq_triton
    from qwen_quant.quantize.gptq import Hessian, gptq_quantize
    from qwen_quant.quantize.grid import Grid

    g = torch.Generator(device="cuda").manual_seed(1)
    W = torch.randn(4096, 4096, device="cuda", generator=g) * 0.02
    h = Hessian(4096, "cuda")
    h.add(torch.randn(8192, 4096, device="cuda", generator=g).half())
    out = {"triton_available": gptq_triton.HAVE_TRITON}
    for name, env in (("eager", "1"), ("triton", "0")):
        os.environ["QWEN_QUANT_NO_TRITON"] = env
        gptq_quantize(W, h.H, Grid(4, 128, True))  # warm-up (and kernel build)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = gptq_quantize(W, h.H, Grid(4, 128, True))
        torch.cuda.synchronize()
        out[f"{name}_seconds"] = round(time.perf_counter() - t0, 4)
        out[f"{name}_codes"] = r.codes
        out[f"{name}_error"] = r.error
    os.environ.pop("QWEN_QUANT_NO_TRITON")
    out["triton_used"] = gptq_triton._STATE["ok"] is True
    out["codes_equal_fraction"] = float((out.pop("eager_codes") == out.pop("triton_codes")).float().mean())
    return out


def ours_side(method: str, model_dir: str, calib: str, device: str) -> dict:
    import numpy as np
    import torch

    from qwen_quant.calib import CalibConfig
    from qwen_quant.progress import set_quiet
    from qwen_quant.quantize import config_for, quantize_model

    set_quiet(True)
    check = solve_check() if device == "cuda" else None
    ids = np.load(calib)
    CalibConfig.samples = lambda self, tokenizer: torch.from_numpy(ids)  # the exact ids the peer got
    n, seqlen = ids.shape
    cfg = config_for(method, model=model_dir, output=str(Path(model_dir).parent / f"ours-{method}-{n}x{seqlen}"),
                      bits=4, group_size=128, sym=method == "gptq", **({"damp": 0.01} if method == "gptq" else {}),
                      format="gptq" if method == "gptq" else "awq", device=device, validate=False, force=True,
                      calib=CalibConfig(nsamples=n, seqlen=seqlen), phases=True)
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401 - imported before the peer's timer too (from_pretrained)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    _, report = quantize_model(cfg)
    seconds = time.perf_counter() - t0
    s = report.extra["quantize"]
    from qwen_quant.quantize.gptq import MM_MODE

    check = {**(check or {}), "hessian_mm_mode": MM_MODE[0]}
    import shutil

    shutil.rmtree(cfg.output, ignore_errors=True)  # disk: a 72B-shaped output is several GB
    steady = [p["seconds"] for p in s["layers"][1:]] or [p["seconds"] for p in s["layers"]]
    peak = s.get("peak_gpu_bytes")  # the run-wide max (quantize_model resets the counter per layer)
    # the peer's timer starts after AutoTokenizer.from_pretrained; ours loads it inside quantize_model,
    # so "seconds" leaves that load out (as the peer's does) and "seconds_with_tokenizer" keeps it
    tok_s = (s.get("setup_seconds") or {}).get("tokenizer", 0.0)
    return {"seconds": round(seconds - tok_s, 2), "seconds_with_tokenizer": round(seconds, 2), "peak_gpu_gib": round(peak / 2**30, 2) if peak else _peak(torch),
            "seconds_internal": s["seconds"], "setup_seconds": s.get("setup_seconds"),
            "steady_seconds_per_layer": round(sum(steady) / len(steady), 3),
            "finish_seconds": s.get("finish_seconds"), "layers": s["layers"], "solve_check": check,
            "config": {"sym": cfg.sym, "format": cfg.format, "true_sequential": cfg.true_sequential,
                       "clip": method == "awq", "batch_size": cfg.batch_size},
            "note": "quantize_model wall time (load, capture, solve, pack and the checkpoint write) less the "
                    "tokenizer load, which the peer's timer also leaves out (seconds_with_tokenizer keeps it)"}


# -- orchestration --------------------------------------------------------------------------------
def run_side(tool: str, method: str, model: Path, calib: Path, a, log: Path) -> dict:
    res = calib.with_name(f"{tool}-{method}-{calib.stem}.result.json")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", tool, "--method", method, "--model", str(model),
           "--calib", str(calib), "--result", str(res), "--device", a.device]
    env = dict(os.environ)
    if a.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # a shared CPU: OpenMP barriers under oversubscription swing times tenfold
    if a.peer_dtype:
        env["SBS_PEER_DTYPE"] = a.peer_dtype
    if tool == "peer":
        env["PYTHONPATH"] = a.peer_path  # only the peer's packages (+ the image's torch/transformers)
    else:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH", ""), str(ROOT)) if p)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        try:
            p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT), timeout=a.side_timeout)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if rc != 0:
        return {"error": f"exit {rc}", "log_tail": log.read_text()[-2500:]}
    r = json.loads(res.read_text())
    r["process_wall_s"] = round(time.perf_counter() - t0, 2)
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--side", choices=("ours", "peer"), help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--calib", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--shape", default="qwen1.5-7b", choices=SHAPES)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--methods", default="gptq,awq")
    ap.add_argument("--large", default="", help="NxSEQ: also run ours at this calibration size (e.g. 512x2048)")
    ap.add_argument("--large-methods", default="gptq")
    ap.add_argument("--peer-path", default=os.environ.get("PEER_PATH", "/tmp/peer"),
                    help="PYTHONPATH holding llm-compressor 0.14 and its pins (pip install --target)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny shape on the CPU, 2 layers, 8 x 128 (about a minute)")
    ap.add_argument("--side-timeout", type=int, default=540)
    ap.add_argument("--peer-dtype", default=None, choices=("float16", "bfloat16", "float32"),
                    help="llm-compressor's model dtype (default: float16 on CUDA, float32 on the CPU)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    if a.side:
        import torch

        torch.manual_seed(0)
        r = (peer_side if a.side == "peer" else ours_side)(a.method, a.model, a.calib, a.device)
        Path(a.result).write_text(json.dumps(r, indent=2))
        return 0

    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch

    if a.smoke:
        a.shape, a.layers, a.nsamples, a.seqlen, a.large = "tiny", 2, 8, 128, a.large or "16x128"
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from qwen_quant.calib import calibration_samples
    from qwen_quant.models import load_tokenizer

    work = Path(a.workdir or tempfile.mkdtemp(prefix="side-by-side-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "subprocess.log"
    out = Path(a.out or ROOT / "bench" / "results" / f"side-by-side-{a.shape}{'-smoke' if a.smoke else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = build(a.shape, a.layers, work / a.shape, a.device)
    if a.device == "cuda":
        torch.cuda.empty_cache()  # the tools' subprocesses get the whole GPU
    build_s = round(time.perf_counter() - t0, 1)
    tok = load_tokenizer(model)  # the built checkpoint carries the Qwen2 tokenizer files
    sizes = [(a.nsamples, a.seqlen)]
    if a.large:
        sizes.append(tuple(int(v) for v in a.large.lower().split("x")))
    calibs = {}
    for n, seq in sizes:
        ids = calibration_samples(tok, nsamples=n, seqlen=seq, seed=0).numpy().astype(np.int64)
        calibs[(n, seq)] = work / f"calib-{n}x{seq}.npy"
        np.save(calibs[(n, seq)], ids)
    h, inter, heads, kv, vocab, depth = SHAPES[a.shape]
    res = {"shape": a.shape, "hidden": h, "intermediate": inter, "heads": heads, "kv_heads": kv,
           "layers_built": a.layers, "full_depth": depth, "device": a.device,
           "gpu": torch.cuda.get_device_name(0) if a.device == "cuda" else None, "torch": torch.__version__,
           "build_seconds": build_s, "grid": "int4, group 128 (GPTQ sym, AWQ asym)",
           "calibration": {f"{n}x{s}": hashlib.sha256(np.load(p).tobytes()).hexdigest() for (n, s), p in calibs.items()},
           "git_commit": _git_commit(),
           "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "extrapolation": "fixed = seconds - layers_built x steady; full_model = fixed + full_depth x steady; "
                            "full_model_seconds_per_layer = full_model / full_depth (both tools alike)",
           "runs": []}
    res["activations"] = [check_finite(model, np.load(calibs[sizes[0]]), a.device, dt) for dt in
                          ((torch.float16,) if a.device == "cuda" else (torch.float32, torch.float16))]
    print(f"[{a.shape}] activations: {json.dumps(res['activations'])}", flush=True)
    plan = [(tool, m, sizes[0]) for m in a.methods.split(",") if m for tool in ("peer", "ours")]
    plan += [("ours", m, sizes[1]) for m in a.large_methods.split(",") if m and len(sizes) > 1]
    for tool, method, (n, seq) in plan:
        print(f"[{a.shape}] {tool} {method} {n}x{seq} ...", flush=True)
        r = run_side(tool, method, model, calibs[(n, seq)], a, log)
        r.update({"tool": "llm-compressor" if tool == "peer" else "qwen-quant", "method": method,
                  "nsamples": n, "seqlen": seq})
        if "seconds" in r:
            r["seconds_per_layer"] = round(r["seconds"] / a.layers, 3)  # of the built layers, fixed costs included
            _extrapolate(r, a.layers, depth)
            print(f"  {r['seconds_per_layer']} s/layer, peak GPU {r.get('peak_gpu_gib')} GiB", flush=True)
        else:
            print(f"  FAILED: {r['error']}", flush=True)
        res["runs"].append(r)
        _ratios(res)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(res, indent=2))
        os.replace(tmp, out)  # partial results survive a later failure or timeout
    print(json.dumps(res["ratios"], indent=2))
    print(f"wrote {out}")
    return 0 if all("seconds" in r for r in res["runs"]) else 1


def _git_commit() -> str:
    """$QWEN_QUANT_GIT_COMMIT when set (a device copy of the tree may carry another repository's
    .git), else ``git rev-parse HEAD`` of the repository this script lives in, '+dirty' if modified."""
    if os.environ.get("QWEN_QUANT_GIT_COMMIT"):
        return os.environ["QWEN_QUANT_GIT_COMMIT"]
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(git + ["status", "--porcelain", "--", "bench", "qwen_quant"], capture_output=True,
                           text=True).stdout.strip()
    return (head or "unknown") + ("+dirty" if dirty else "")


def _extrapolate(r: dict, built: int, depth: int) -> None:
    """Full-depth figures from the fixed cost (wall time not spent in the steady per-layer loop) and
    the steady seconds per layer, for either tool (see the JSON's "extrapolation")."""
    steady = r.get("steady_seconds_per_layer")
    if not steady:
        r["extrapolated_full_model_minutes"] = round(r["seconds_per_layer"] * depth / 60, 1)
        return
    fixed = r["seconds"] - built * steady
    full = fixed + depth * steady
    r.update({"fixed_seconds": round(fixed, 2), "full_model_seconds": round(full, 1),
              "full_model_seconds_per_layer": round(full / depth, 3),
              "extrapolated_full_model_minutes": round(full / 60, 1)})


def _ratios(res: dict) -> None:
    """ours / llm-compressor per method at the shared calibration size: ``m`` (wall time of the built
    layers), ``m_steady`` (steady seconds per layer) and ``m_full_model`` (the full-depth extrapolation,
    i.e. the per-layer figure of a full-depth model, on which the issue's targets are judged)."""
    res["ratios"] = {}
    for m in ("gptq", "awq"):
        runs = [r for r in res["runs"] if r["method"] == m and "seconds" in r]
        peer = [r for r in runs if r["tool"] == "llm-compressor"]
        ours = [r for r in runs if r["tool"] == "qwen-quant" and peer and r["nsamples"] == peer[0]["nsamples"]
                and r["seqlen"] == peer[0]["seqlen"]]
        if peer and ours:
            res["ratios"][m] = round(ours[0]["seconds_per_layer"] / peer[0]["seconds_per_layer"], 3)
            if ours[0].get("steady_seconds_per_layer") and peer[0].get("steady_seconds_per_layer"):
                res["ratios"][f"{m}_steady"] = round(ours[0]["steady_seconds_per_layer"]
                                                     / peer[0]["steady_seconds_per_layer"], 3)
            if ours[0].get("full_model_seconds") and peer[0].get("full_model_seconds"):
                res["ratios"][f"{m}_full_model"] = round(ours[0]["full_model_seconds"] / peer[0]["full_model_seconds"], 3)


if __name__ == "__main__":
    sys.exit(main())
