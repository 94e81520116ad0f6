"""Run-to-run noise of clean evaluations, per backend and thread count: what `check`'s defaults must tolerate.

Each clean artifact of the untied fixture (GPTQ, AWQ, compressed-tensors on torch; GGUF q8_0 on
llama.cpp; ONNX int4 on onnxruntime) is scored ``--repeats`` times at each thread count against the
same reference, and the spread (max - min over every run) of perplexity (relative), mean KL
(absolute and relative) and top-1 agreement (points) is printed as JSON. docs/gate.md records the
numbers and how the defaults in `qwen_quant.check` were chosen from them.

    .venv/bin/python bench/gate_noise.py [--smoke] [--out bench/results/gate-noise.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def open_with_threads(kind: str, path: Path, threads: int):
    import torch

    if kind == "gguf":
        from qwen_quant.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend(path, device="cpu", n_threads=threads)
    if kind == "onnx":
        from qwen_quant.backends.onnxrt import OrtBackend

        return OrtBackend(path, device="cpu", threads=threads)
    from qwen_quant.backends.torch_backend import TorchBackend

    torch.set_num_threads(threads)
    return TorchBackend(path, device="cpu")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="one type, 2 runs, 256 tokens (checks the script works)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    import gate_helpers as g
    import numpy as np
    import torch

    from qwen_quant.backends.torch_backend import TorchBackend
    from qwen_quant.calib import eval_tokens
    from qwen_quant.models.loader import load_tokenizer
    from qwen_quant.progress import set_quiet
    from qwen_quant.validate import EvalConfig, evaluate

    set_quiet(True)
    types = ("gguf",) if a.smoke else g.TYPES
    repeats, threads = (2, [1]) if a.smoke else (a.repeats, [int(t) for t in a.threads.split(",")])
    cfg = EvalConfig(ctx=64 if a.smoke else a.ctx, max_tokens=256 if a.smoke else a.max_tokens, greedy_tokens=0)
    ref_path = g.reference()
    tokens = np.asarray(eval_tokens(load_tokenizer(ref_path), cfg.data, max_tokens=cfg.max_tokens), dtype=np.int64)
    torch.set_num_threads(2)
    ref = TorchBackend(ref_path, device="cpu")
    out = {"ctx": cfg.ctx, "tokens": int(len(tokens)), "types": {}}
    for kind in types:
        path, runs = g.artifact(kind), []
        for th in threads:
            b = open_with_threads(kind, path, th)
            for _ in range(repeats):
                t0 = time.perf_counter()
                m = evaluate(b, tokens, cfg, ref)
                runs.append({"threads": th, "perplexity": m["perplexity"], "kl_mean": m["kl_mean"],
                             "top1": m["top1_agreement"], "s": round(time.perf_counter() - t0, 2)})
            b.close()
        ppl, kl, top = (np.array([r[k] for r in runs]) for k in ("perplexity", "kl_mean", "top1"))
        same_threads = [np.ptp([r["kl_mean"] for r in runs if r["threads"] == th]) for th in threads]
        out["types"][kind] = {"runs": runs, "ppl_spread_rel": float(np.ptp(ppl) / ppl.min()),
                              "kl_mean": float(kl.mean()), "kl_spread": float(np.ptp(kl)),
                              "kl_spread_same_threads": float(max(same_threads)),
                              "kl_spread_rel": float(np.ptp(kl) / kl.min()), "top1_spread_points": float(np.ptp(top) * 100)}
        print(kind, json.dumps({k: v for k, v in out["types"][kind].items() if k != "runs"}), flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
