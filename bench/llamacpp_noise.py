"""How far llama.cpp's CPU row is from exact float32 math on the SAME quantized weights, on random models
built like the CUDA bench's (``bench/llamacpp_cuda.py``): the noise floor of a llama.cpp runtime.

    python bench/llamacpp_noise.py --hidden 2048 --layers 32 --json bench/results/llamacpp-noise-2048x32.json

Why: on an H100, llama.cpp CUDA vs llama.cpp CPU on a random 7B-shaped q4_k_m agreed on only 88%
of top-1 tokens (KL 0.016), which the CUDA bench's a-priori parity limits flag. Both runtimes
quantize activations (the CPU to q8_K, CUDA's MMQ to q8_1) and sum in their own order; on random
weights many top-2 gaps are small. This measures what one runtime alone costs against exact math: the
q4_k_m GGUF is dequantized with gguf-py (``gguf.quants.dequantize``) into a float32 transformers model
(the exact reference), and llama.cpp's CPU backend is evaluated against it with our usual metrics. No GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import llamacpp_cuda as lc  # noqa: E402  (its random-model recipe, f16 writer and exact model)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=0, help="default: 2.6875 x hidden (Qwen1.5-7B's ratio)")
    p.add_argument("--heads", type=int, default=0, help="default: hidden / 128")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--qtype", default="q4_k_m")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--greedy-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json")
    a = p.parse_args(argv)

    import os

    from transformers import AutoTokenizer

    from qwen_quant.backends.llamacpp import LlamaCppBackend
    from qwen_quant.backends.torch_backend import TorchBackend
    from qwen_quant.calib import default_tokenizer_dir, eval_tokens, greedy_prompts
    from qwen_quant.export.gguf_quant import quantize_gguf
    from qwen_quant.validate import EvalConfig, evaluate

    heads = a.heads or max(1, a.hidden // 128)
    shape = f"random-{a.hidden}x{a.layers}"
    lc.SHAPES[shape] = (a.hidden, a.intermediate or int(a.hidden * 2.6875) // 64 * 64, heads, heads, a.layers, 151936)
    threads = a.threads or os.cpu_count() or 1
    tok = AutoTokenizer.from_pretrained(str(default_tokenizer_dir()))
    tokens = np.asarray(eval_tokens(tok, "shipped", max_tokens=a.tokens), dtype=np.int64)
    prompts = [ids for _, ids in greedy_prompts(tok)][: a.prompts]
    cfg = EvalConfig(ctx=a.ctx, greedy_tokens=a.greedy_tokens)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        f16 = lc.make_f16(shape, Path(tmp) / "model-f16.gguf")
        q = Path(tmp) / f"model-{a.qtype}.gguf"
        quantize_gguf(f16, q, a.qtype, nthread=threads)
        f16.unlink()
        ref = TorchBackend(lc.exact_model(q, shape), device="cpu")
        with LlamaCppBackend(q, device="cpu", n_ctx=a.ctx, n_threads=threads) as cpu:
            m = evaluate(cpu, tokens, cfg, ref, prompts)
    out = {"bench": "llamacpp_noise", "shape": dict(zip(("hidden", "intermediate", "heads", "kv_heads", "layers", "vocab"),
                                                        lc.SHAPES[shape])),
           "qtype": a.qtype, "ctx": a.ctx, "threads": threads, "seconds": round(time.perf_counter() - t0, 1),
           "reference": "float32 transformers on the dequantized GGUF weights", "test": "llama.cpp CPU",
           "metrics": {k: m[k] for k in ("tokens_scored", "perplexity", "ref_perplexity", "kl_mean", "kl_p99", "kl_max",
                                         "top1_agreement", "greedy_exact", "greedy_prompts", "greedy_prefix_mean") if k in m}}
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
