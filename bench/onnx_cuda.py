"""Our ONNX exports on onnxruntime's CUDA EP vs its CPU EP vs the torch model: logits parity and tokens/s.

    python bench/onnx_cuda.py                                    # trained tiny fixture, CUDA + CPU EPs
    python bench/onnx_cuda.py --providers cpu                    # CPU only (CI / no GPU), about a minute
    python bench/onnx_cuda.py --shape qwen2-7b --layers 2 --json out.json   # Qwen2-7B widths, random weights

Variants, all written by ``qwen-quant export onnx``: ``fp32`` and ``fp16`` from the full-precision model,
and ``int4-gptq`` / ``int4-gptq-fp16``: a GPTQ checkpoint (our quantizer, group 128, act-order) exported
with its own codes in MatMulNBits. Each variant runs on every requested execution provider; the session's
actual providers are recorded, so a silent fall back to the CPU shows in the table.

Parity: KL(reference || variant) and top-1 agreement of teacher-forced logits on the shipped evaluation
text. The reference is the torch fp32 model the variant was exported from (the dequantized GPTQ checkpoint
for the int4 rows, so their KL measures the runtime, not the quantization; ``kl_vs_fp32`` adds the distance
to the full-precision model). Throughput: prefill tokens/s over one ``--prompt`` token pass (batch 1) and
decode tokens/s over ``--decode`` greedy steps with the KV cache kept on the device through IOBinding.
The torch rows run the same loops in transformers (fp32, and fp16 on CUDA). The onnxruntime rows run
through the product's backend (`qwen_quant.backends.onnxrt`, IO binding, logits out through DLPack).

CUDA EP vs CPU EP, per variant run on both: KL and top-1 between the two runtimes on the same export, and
the verdict the llama.cpp CUDA bench uses (`bench/llamacpp_cuda.py`, `check_vs_exact`): both rows scored
against exact float32 math, the CUDA row at most 3x the CPU row's KL (or the floor) and at most 5 points
of top-1 lower. A failed verdict makes the script exit 1.

The qwen2-7b shape has random weights (KL numbers then only compare runtimes) and ``--layers`` decoder
layers (default 2) so the export fits in minutes; the per-layer MatMul shapes are the real model's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # name: (hidden, intermediate, heads, kv_heads, vocab, tied)
    "qwen2-7b": (3584, 18944, 28, 4, 152064, False),
    "random-small": (256, 512, 4, 2, 152064, False),  # the random-weights path at a CPU size
}
VARIANTS = ("fp32", "fp16", "int4-gptq", "int4-gptq-fp16")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_model(args, work: Path) -> Path:
    """The full-precision checkpoint: the trained tiny fixture, or a random Qwen2-7B-wide model."""
    if args.shape == "tiny":
        from qwen_quant.fixtures import fixture_path

        return fixture_path("qwen2-tiny-tied")
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwen_quant.calib import default_tokenizer_dir

    h, inter, heads, kv, vocab, tied = SHAPES[args.shape]
    out = work / f"random-{args.shape}-{args.layers}l"
    if (out / "config.json").exists():
        return out
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=args.layers,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied,
                      max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    for f in Path(default_tokenizer_dir()).iterdir():
        if f.is_file() and f.name.startswith(("tokenizer", "vocab", "merges")):
            shutil.copy2(f, out / f.name)
    return out


def make_gptq(src: Path, work: Path, device: str) -> Path:
    from qwen_quant.calib import CalibConfig
    from qwen_quant.quantize import config_for, quantize_model

    out = work / (src.name + "-gptq")
    if not (out / "config.json").exists():
        log(f"GPTQ (group 128, act-order) of {src} on {device}")
        cfg = config_for("gptq", model=str(src), output=str(out), device=device, force=True, validate=False,
                         group_size=128, sym=True, desc_act=True, calib=CalibConfig(nsamples=16, seqlen=256))
        quantize_model(cfg)
    return out


def export(model: Path, out: Path, fp16: bool) -> Path:
    from qwen_quant.export.onnx import OnnxExportConfig, export_onnx

    if not (out / "model.onnx").exists():
        t = time.perf_counter()
        export_onnx(OnnxExportConfig(model=str(model), output=str(out), fp16=fp16, force=True, validate=False))
        log(f"exported {out.name} in {time.perf_counter() - t:.0f}s")
    return out


def providers_for(requested: list[str]) -> list[str]:
    import onnxruntime as ort

    have = ort.get_available_providers()
    if "cuda" in requested and "CUDAExecutionProvider" not in have:
        log(f"CUDAExecutionProvider is not available in onnxruntime {ort.__version__} (it has {', '.join(have)}); "
            "install onnxruntime-gpu for the CUDA rows. Running the CPU rows only.")
        requested = [p for p in requested if p != "cuda"] or ["cpu"]
    return requested


def kl_top1(ref: np.ndarray, test: np.ndarray) -> tuple[float, float]:
    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(test)
    kl = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
    return kl, float((ref.argmax(-1) == test.argmax(-1)).mean())


class OrtRunner:
    """The product's onnxruntime backend (IO binding, cache and logits on the session's device), timed."""

    def __init__(self, path: Path, provider: str):
        from qwen_quant.backends.onnxrt import OrtBackend

        self.backend = OrtBackend(path, device="cuda" if provider == "cuda" else "cpu", chunk=1 << 20)
        self.actual = self.backend.session.get_providers()[0]

    def logits(self, ids: np.ndarray) -> np.ndarray:
        return self.backend.device_logits(ids).float().cpu().numpy()

    def timed(self, prompt: np.ndarray, n: int) -> tuple[float, float]:
        be = self.backend
        one = lambda t: np.ones((1, t), np.int64)  # noqa: E731
        be._bound_step(prompt[:, :8], one(8), np.arange(8)[None], None)  # warm-up: kernels, allocator
        t0 = time.perf_counter()
        lg, past = be._bound_step(prompt, one(prompt.shape[1]), np.arange(prompt.shape[1])[None], None)
        tok = int(lg[0, -1].float().argmax())  # argmax on the device: this waits for the prefill
        t1 = time.perf_counter()
        t = prompt.shape[1]
        for _ in range(n):
            lg, past = be._bound_step(np.array([[tok]], np.int64), one(t + 1), np.array([[t]], np.int64), past)
            tok = int(lg[0, -1].float().argmax())
            t += 1
        return prompt.shape[1] / (t1 - t0), n / (time.perf_counter() - t1)


def ep_verdict(cuda: dict, cpu: dict, between: tuple[float, float]) -> dict:
    """The CUDA EP row judged as the llama.cpp CUDA bench judges its row (`check_vs_exact`).

    Both rows are scored against the same exact float32 torch model; the CUDA row may be at most 3x as
    far in KL as the CPU row (or the floor) and lose at most 5 points of top-1 more.
    """
    sys.path.insert(0, str(ROOT / "bench"))
    from llamacpp_cuda import EXACT_LIMITS, check_vs_exact

    def row(r):
        return {"kl_mean": r["kl"], "top1_agreement": r["top1"], "perplexity": 0.0 if np.isfinite(r["kl"]) else float("nan")}

    why = check_vs_exact(row(cuda), row(cpu))
    return {"variant": cuda["variant"], "cuda_vs_cpu_kl": between[0], "cuda_vs_cpu_top1": between[1],
            "cuda_kl_vs_exact": cuda["kl"], "cpu_kl_vs_exact": cpu["kl"], "limits": EXACT_LIMITS,
            "ok": not why, "failures": why}


class TorchRunner:
    def __init__(self, path: Path, device: str, dtype: str):
        from qwen_quant.models.loader import load_model

        import inspect

        self.model = load_model(path, device, dtype)
        self.device = device
        params = inspect.signature(self.model.forward).parameters  # transformers 5.2x: past_key_values -> cache
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.actual = f"torch-{device}"

    def _fwd(self, ids, cache=None):
        import torch
        from transformers import DynamicCache

        cache = DynamicCache() if cache is None else cache
        with torch.no_grad():
            out = self.model(input_ids=torch.as_tensor(ids, device=self.device), use_cache=True,
                             **{self.cache_kw: cache})
        return out.logits, cache

    def logits(self, ids: np.ndarray) -> np.ndarray:
        return self._fwd(ids)[0].float().cpu().numpy()

    def timed(self, prompt: np.ndarray, n: int) -> tuple[float, float]:
        import torch

        sync = torch.cuda.synchronize if self.device.startswith("cuda") else (lambda: None)
        self._fwd(prompt[:, :8])
        sync()
        t0 = time.perf_counter()
        lg, cache = self._fwd(prompt)
        sync()
        t1 = time.perf_counter()
        tok = lg[:, -1:].argmax(-1)
        for _ in range(n):
            lg, cache = self._fwd(tok, cache)
            tok = lg[:, -1:].argmax(-1)
        sync()
        return prompt.shape[1] / (t1 - t0), n / (time.perf_counter() - t1)


def eval_ids(n_tokens: int, vocab: int) -> np.ndarray:
    from transformers import AutoTokenizer

    from qwen_quant.calib import eval_tokens
    from qwen_quant.fixtures import tokenizer_dir

    toks = np.asarray(eval_tokens(AutoTokenizer.from_pretrained(str(tokenizer_dir())), "shipped", max_tokens=n_tokens))
    return np.clip(toks[:n_tokens], 0, vocab - 1).astype(np.int64)[None]


def run(args) -> dict:
    import torch

    from qwen_quant.progress import set_quiet

    set_quiet(not args.verbose)
    requested = providers_for([p.strip() for p in args.providers.split(",") if p.strip()])
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = set(variants) - set(VARIANTS)
    if bad:
        raise SystemExit(f"unknown variant(s) {sorted(bad)}; choose from {', '.join(VARIANTS)}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="onnx-cuda-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    src = make_model(args, work)
    gptq = make_gptq(src, work, "cuda" if gpu else "cpu") if any(v.startswith("int4") for v in variants) else None
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    ids = eval_ids(args.prompt, vocab)

    refs = {}
    rows, verdicts = [], []

    def ref_logits(which: Path) -> np.ndarray:
        if which not in refs:
            refs[which] = TorchRunner(which, "cpu", "float32").logits(ids)
        return refs[which]

    torch_rows = [("torch-fp32", src, "cpu", "float32")]
    if gpu:
        torch_rows += [("torch-fp32", src, "cuda", "float32"), ("torch-fp16", src, "cuda", "float16")]
    for name, path, dev, dt in torch_rows:
        r = TorchRunner(path, dev, dt)
        kl, top1 = kl_top1(ref_logits(src), r.logits(ids))
        pre, dec = r.timed(ids, args.decode)
        rows.append(dict(variant=name, provider=r.actual, kl=kl, top1=top1, kl_vs_fp32=kl, prefill_tok_s=pre,
                         decode_tok_s=dec))
        log(_line(rows[-1]))
        del r
    for v in variants:
        base = gptq if v.startswith("int4") else src
        out = export(base, work / f"onnx-{v}", fp16=v.endswith("fp16"))
        by_ep = {}
        for p in requested:
            r = OrtRunner(out, p)
            lg = by_ep[p] = r.logits(ids)
            kl, top1 = kl_top1(ref_logits(base), lg)
            kl32 = kl if base == src else kl_top1(ref_logits(src), lg)[0]
            pre, dec = r.timed(ids, args.decode)
            rows.append(dict(variant=f"onnx-{v}", provider=r.actual, kl=kl, top1=top1, kl_vs_fp32=kl32,
                             prefill_tok_s=pre, decode_tok_s=dec))
            log(_line(rows[-1]))
            del r
        if {"cuda", "cpu"} <= set(by_ep):
            cu, cp = rows[-len(requested):][requested.index("cuda")], rows[-len(requested):][requested.index("cpu")]
            verdicts.append(ep_verdict(cu, cp, kl_top1(by_ep["cpu"], by_ep["cuda"])))
            log(f"{v}: CUDA EP vs CPU EP KL {verdicts[-1]['cuda_vs_cpu_kl']:.2e} top-1 {verdicts[-1]['cuda_vs_cpu_top1']:.4f}; "
                f"verdict vs exact: {'ok' if verdicts[-1]['ok'] else '; '.join(verdicts[-1]['failures'])}")
    import onnxruntime as ort

    return {"shape": args.shape, "layers": args.layers if args.shape != "tiny" else 2, "model": str(src),
            "prompt_tokens": int(ids.shape[1]), "decode_tokens": args.decode, "onnxruntime": ort.__version__,
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if gpu else None, "rows": rows,
            "cuda_vs_cpu": verdicts}


def _line(r: dict) -> str:
    return (f"{r['variant']:<22} {r['provider']:<24} KL {r['kl']:.2e} top-1 {r['top1']:.4f} "
            f"KL(fp32) {r['kl_vs_fp32']:.2e} prefill {r['prefill_tok_s']:9.1f} tok/s decode {r['decode_tok_s']:7.1f} tok/s")


def table(res: dict) -> str:
    head = (f"shape {res['shape']} ({res['layers']} layers), prompt {res['prompt_tokens']} tokens, decode "
            f"{res['decode_tokens']}, onnxruntime {res['onnxruntime']}, torch {res['torch']}, GPU {res['gpu']}\n\n"
            "| variant | runs on | KL vs its torch model | top-1 | KL vs fp32 | prefill tok/s | decode tok/s |\n"
            "|---|---|---|---|---|---|---|\n")
    return head + "".join(f"| {r['variant']} | {r['provider']} | {r['kl']:.2e} | {r['top1']:.4f} | {r['kl_vs_fp32']:.2e} | "
                          f"{r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} |\n" for r in res["rows"]) + \
        "".join(f"\n{v['variant']}: CUDA EP vs CPU EP KL {v['cuda_vs_cpu_kl']:.2e}, top-1 {v['cuda_vs_cpu_top1']:.4f}; "
                f"verdict vs exact float32: {'ok' if v['ok'] else 'FAILED: ' + '; '.join(v['failures'])}\n"
                for v in res.get("cuda_vs_cpu", []))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=["tiny", *SHAPES], default="tiny")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the random wide model")
    ap.add_argument("--providers", default="cuda,cpu", help="comma list of cuda, cpu")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (parity and prefill)")
    ap.add_argument("--decode", type=int, default=32, help="greedy decode steps timed")
    ap.add_argument("--workdir", help="keep models and exports here (reused when present)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--verbose", action="store_true", help="show export/quantization progress")
    args = ap.parse_args(argv)
    res = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    print(table(res))
    return 0 if all(v["ok"] for v in res.get("cuda_vs_cpu", [])) else 1


if __name__ == "__main__":
    raise SystemExit(main())
