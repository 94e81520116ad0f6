"""Benchmark: qwen-quant vs llm-compressor (the peer) on CPU, same fixture, same calibration tokens.

Why a second venv: llmcompressor 0.14 pins transformers <= 5.17 and compressed-tensors 0.19, while
qwen-quant runs on transformers 5.24 / compressed-tensors 0.20. So the peer's quantization runs in
``/tmp/peer-venv`` (``bench/peer_requirements.txt``, torch pinned to the same 2.13.0) as a
subprocess of this script (``--peer``), and everything else runs in our venv:

1. our calibration windows (``calibration_samples(tok, nsamples, seqlen, seed=0)``) are saved as
   int64 ids; the peer gets them as a ``datasets.Dataset`` of input_ids/attention_mask (already
   tokenized, so llm-compressor uses them as they are; no shuffling), qwen-quant samples the same
   windows itself (checked equal);
2. each tool quantizes in its own subprocess (``--peer`` / ``--ours``), so its wall time and peak RSS
   (``VmHWM``) are its own: wall time covers load model + quantize + save, not the imports; each runs
   with one torch thread (``--threads``), since OpenMP barriers on an oversubscribed shared CPU made
   per-layer times swing tenfold with two;
3. every output (all compressed-tensors checkpoints) is measured by the same
   ``qwen_quant.validate.run_eval`` against the full-precision fixture.

    python bench/peer_llmcompressor.py --fixture qwen2-tiny-untied --fixture qwen2-tiny-tied
    # the hard fixture (planted outlier channels, qwen_quant/faults/outliers.py), test_quality.py's settings:
    python bench/peer_llmcompressor.py --fixture qwen2-tiny-untied-outliers --nsamples 32 --ctx 128 --max-tokens 2048

Setup of the peer venv (torch first, so nothing pulls another torch)::

    python3 -m venv /tmp/peer-venv
    /tmp/peer-venv/bin/pip install torch==2.13.0
    /tmp/peer-venv/bin/pip install -c <(echo torch==2.13.0) -r bench/peer_requirements.txt
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER_PYTHON = os.environ.get("PEER_PYTHON", "/tmp/peer-venv/bin/python")
METHODS = ("gptq", "awq")
PEER_PACKAGES = ("torch", "transformers", "llmcompressor", "compressed-tensors", "datasets", "accelerate", "auto-round")
OUR_PACKAGES = ("torch", "transformers", "compressed-tensors", "numpy")


def _versions(names) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = None
    return out


def _rss_bytes() -> int:
    """Peak RSS of this process image: VmHWM, not ru_maxrss.

    Linux carries ru_maxrss across execve, so a child forked from the orchestrator (which holds
    the evaluated models) would report the orchestrator's peak; VmHWM belongs to the new image.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- peer side (runs under /tmp/peer-venv) ------------------------------------------------------
def peer_quantize(method: str, model_dir: str, calib: str, out: str, damp: float) -> dict:
    import numpy as np
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    patches = []
    if not torch.accelerator.is_available():
        # llmcompressor 0.14.0.1's AWQ pins its cached activations unconditionally
        # (IntermediatesCache.pin_memory), which raises "Cannot access accelerator device when none
        # is available" on CPU-only torch. Pinning only speeds up host-to-device copies, so a no-op
        # changes nothing numerically.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *a, **k: None
        patches.append("IntermediatesCache.pin_memory -> no-op (CPU-only torch)")
    ids = np.load(calib)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist()})
    if method == "gptq":
        recipe = [GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"], dampening_frac=damp,
                               actorder=None, block_size=128)]
    else:
        # the current (non-deprecated) AWQ spelling: a scale transform, then RTN by QuantizationModifier
        recipe = [AWQModifier(duo_scaling=True, n_grid=20),
                  QuantizationModifier(targets="Linear", scheme="W4A16_ASYM", ignore=["lm_head"])]
    rss_import = _rss_bytes()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    t_load = time.perf_counter() - t0
    oneshot(model=model, processor=tok, dataset=ds, recipe=recipe, num_calibration_samples=len(ids),
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    t_quant = time.perf_counter() - t0 - t_load
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)
    seconds = time.perf_counter() - t0
    return {"tool": "llm-compressor", "method": method, "seconds": round(seconds, 2),
            "seconds_load": round(t_load, 2), "seconds_oneshot": round(t_quant, 2),
            "peak_rss_bytes": _rss_bytes(), "rss_after_import_bytes": rss_import,
            "recipe": [repr(m) for m in recipe], "batch_size": 1, "patches": patches, "versions": _versions(PEER_PACKAGES),
            "torch_threads": torch.get_num_threads()}


# -- our side -----------------------------------------------------------------------------------
def ours_quantize(method: str, model_dir: str, calib: str, out: str, damp: float) -> dict:
    import numpy as np
    import torch

    import qwen_quant
    from qwen_quant.calib import CalibConfig
    from qwen_quant.progress import set_quiet
    from qwen_quant.quantize import config_for, quantize_model

    set_quiet(True)
    ids = np.load(calib)
    n, seqlen = ids.shape
    # The peer gets pre-tokenized ids, so qwen-quant gets the same array instead of tokenizing the
    # shipped corpus itself (the orchestrator checked that it would sample exactly these windows);
    # neither tool's time or RSS then includes tokenization.
    CalibConfig.samples = lambda self, tokenizer: torch.from_numpy(ids)
    extra = {"desc_act": False, "damp": damp} if method == "gptq" else {}
    cfg = config_for(method, model=model_dir, output=out, bits=4, group_size=128, sym=method == "gptq", **extra,
                      format="compressed-tensors", device="cpu", validate=False,
                      force=True, calib=CalibConfig(nsamples=n, seqlen=seqlen, seed=0))
    rss_import = _rss_bytes()
    t0 = time.perf_counter()
    _, report = quantize_model(cfg)
    seconds = time.perf_counter() - t0
    s = report.extra["quantize"]
    return {"tool": "qwen-quant", "method": method, "seconds": round(seconds, 2), "seconds_internal": s["seconds"],
            "peak_rss_bytes": _rss_bytes(), "rss_after_import_bytes": rss_import, "batch_size": cfg.batch_size,
            "config": {"bits": 4, "group_size": 128, "sym": cfg.sym, "desc_act": False, "damp": damp,
                       "format": cfg.format}, "versions": _versions(OUR_PACKAGES),
            "torch_threads": torch.get_num_threads(),
            "qwen_quant_version": qwen_quant.__version__, "layers": s["layers"]}


# -- orchestration (our venv) ---------------------------------------------------------------------
def _run_side(flag: str, python: str, method: str, model: Path, calib: Path, out: Path, damp: float,
              log: Path, threads: int) -> dict:
    res = out.with_suffix(".result.json")
    cmd = [python, str(Path(__file__).resolve()), flag, method, "--model", str(model), "--calib", str(calib),
           "--out", str(out), "--result", str(res), "--damp", str(damp)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)} if flag == "--ours" else {
        k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    if p.returncode != 0:
        tail = log.read_text()[-3000:]
        return {"error": f"exit code {p.returncode}", "log_tail": tail}
    r = json.loads(res.read_text())
    r["process_wall_s"] = round(time.perf_counter() - t0, 2)
    return r


def _evaluate(artifact: Path, reference: Path, ctx: int, max_tokens: int, greedy: int) -> dict:
    from qwen_quant.validate import EvalConfig, run_eval

    r = run_eval(artifact, EvalConfig(ctx=ctx, max_tokens=max_tokens, greedy_tokens=greedy), reference=reference,
                 device="cpu")
    size = sum(f.stat().st_size for f in artifact.glob("*.safetensors"))
    return {"metrics": r.metrics, "dataset": r.dataset, "eval_wall_s": r.wall_time_s, "size_bytes": size}


def run_fixture(fixture: str, a, work: Path, log: Path) -> dict:
    import numpy as np
    import torch
    import transformers

    import qwen_quant
    from qwen_quant.calib import CalibConfig, calibration_samples
    from qwen_quant.models import load_tokenizer
    from qwen_quant.fixtures import fixture_path

    src = fixture_path(fixture)
    t0 = time.perf_counter()
    ids = calibration_samples(load_tokenizer(src), nsamples=a.nsamples, seqlen=a.seqlen, seed=0).numpy()
    tokenize_s = time.perf_counter() - t0
    again = CalibConfig(nsamples=a.nsamples, seqlen=a.seqlen, seed=0).samples(load_tokenizer(src)).numpy()
    if not np.array_equal(again, ids):  # what quantize_model would sample on its own
        raise SystemExit("qwen-quant's own calibration sampling differs from the exported ids; comparison void")
    calib = work / f"{fixture}-calib.npy"
    np.save(calib, ids.astype(np.int64))
    runs = []
    for method in a.methods:
        for tool, flag, python in (("llm-compressor", "--peer", a.peer_python), ("qwen-quant", "--ours", sys.executable)):
            out = work / f"{fixture}-{tool}-{method}"
            print(f"[{fixture}] {tool} {method} ...", flush=True)
            r = _run_side(flag, python, method, src, calib, out, a.damp, log, a.threads)
            r.setdefault("tool", tool)
            r.setdefault("method", method)
            if "error" not in r:
                print(f"  quantized in {r['seconds']} s, peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB; evaluating",
                      flush=True)
                r["eval"] = _evaluate(out, src, a.ctx, a.max_tokens, a.greedy_tokens)
                m = r["eval"]["metrics"]
                print(f"  ppl {m['perplexity']:.4f} (ref {m['ref_perplexity']:.4f}) kl {m['kl_mean']:.5f} "
                      f"top1 {m['top1_agreement']:.4f} greedy {m['greedy_prefix_mean']:.1f}", flush=True)
            else:
                print(f"  FAILED: {r['error']}", flush=True)
            runs.append(r)
    return {
        "fixture": fixture, "fixture_path": str(src), "fixture_info": json.loads((src / "fixture.json").read_text()),
        "calibration": {"source": "shipped", "nsamples": a.nsamples, "seqlen": a.seqlen, "seed": 0,
                        "tokenize_and_sample_s": round(tokenize_s, 2), "sha256_ids": __import__("hashlib").sha256(ids.astype(np.int64).tobytes()).hexdigest()},
        "quantize_threads": a.threads, "eval_config": {"ctx": a.ctx, "max_tokens": a.max_tokens, "greedy_tokens": a.greedy_tokens},
        "device": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                   "load_avg_at_start": a.load_start, "load_avg_at_end": list(os.getloadavg()),
                   "shared": "2 cores shared with other agents' jobs; timings are indicative only"},
        "our_versions": {**_versions(OUR_PACKAGES), "torch_runtime": torch.__version__,
                         "transformers_runtime": transformers.__version__, "qwen_quant": qwen_quant.__version__},
        "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip(),
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "runs": runs,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peer", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--ours", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--model")
    ap.add_argument("--calib")
    ap.add_argument("--out")
    ap.add_argument("--result")
    ap.add_argument("--fixture", action="append", help="fixture name (repeatable; default qwen2-tiny-untied)")
    ap.add_argument("--methods", default="gptq,awq")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--greedy-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of each quantizing process (1: robust to a shared, oversubscribed CPU)")
    ap.add_argument("--peer-python", default=PEER_PYTHON)
    ap.add_argument("--results-dir", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()

    if a.peer or a.ours:
        side = peer_quantize if a.peer else ours_quantize
        if a.ours:
            sys.path.insert(0, str(ROOT))
        r = side(a.peer or a.ours, a.model, a.calib, a.out, a.damp)
        Path(a.result).write_text(json.dumps(r, indent=2))
        return 0

    a.methods = [m for m in a.methods.split(",") if m]
    a.load_start = list(os.getloadavg())
    work = Path(a.workdir or tempfile.mkdtemp(prefix="peer-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "subprocess.log"
    print(f"work dir {work}; subprocess output in {log}", flush=True)
    sys.path.insert(0, str(ROOT))
    for fixture in a.fixture or ["qwen2-tiny-untied"]:
        res = run_fixture(fixture, a, work, log)
        path = Path(a.results_dir) / f"peer-cpu-{fixture}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(res, indent=2))
        os.replace(tmp, path)
        print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
