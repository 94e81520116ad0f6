"""llama.cpp on CUDA vs llama.cpp on the CPU, same GGUF: parity (KL, top-1, greedy) and throughput.

Driven by ``bench/llamacpp_cuda.sh`` (which builds llama-cpp-python with CUDA on the GPU machine first):

    python bench/llamacpp_cuda.py make-f16 --shape qwen1.5-7b --out /tmp/m/model-f16.gguf
    python bench/llamacpp_cuda.py run --f16 /tmp/m/model-f16.gguf --json out.json     # exit 1 on a parity failure
    python bench/llamacpp_cuda.py smoke [--inject-garbage]                              # CPU only, < 1 minute
    python bench/llamacpp_cuda.py table out.json                                        # the docs/benchmarks.md section

The model is 7B-shaped with random weights, written straight to a float GGUF by our writer's metadata,
vocabulary and tensor-name code (no 15 GB safetensors detour) and quantized by our quantizer
(`quantize_gguf`, which calls llama.cpp's own quantizer through the freshly built wheel). Random weights
say nothing about quality; they are enough to compare two runtimes of the same file.

The CUDA row is evaluated with the CPU row as its reference, so its KL/top-1/greedy numbers are parity
*between the runtimes*. Both rows are then scored against exact float32 math on the same weights (the
GGUF dequantized by gguf-py into a transformers model, on the GPU): the verdict asks the CUDA row to
stay within 3x the CPU row's own KL from exact and within 5 points of its top-1 (`check_vs_exact`),
because on random weights two healthy runtimes already disagree more than fixed limits allow
(`bench/llamacpp_noise.py`); `--no-exact` falls back to the fixed CUDA-vs-CPU limits (`check_parity`).
The known Qwen2 failure on CUDA (fp16 overflow in attention without flash attention: NaN or a single
repeated token, "GGGG") fails both verdicts (exit 1): non-finite metrics, or a KL and top-1 far outside
any limit. ``--inject-garbage`` replaces the CUDA row by that failure (one token always wins) to show
that the check catches it (tests/test_bench_llamacpp_cuda.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # name: (hidden, intermediate, heads, kv_heads, layers, vocab)
    "qwen1.5-7b": (4096, 11008, 32, 32, 32, 151936),
    "qwen2-7b": (3584, 18944, 28, 4, 28, 152064),
    "tiny": (256, 512, 4, 2, 2, 151936),  # --smoke: same code path, seconds on 2 cores
}


def _model_dir(shape: str, tmp: Path) -> Path:
    """config.json + the Qwen2 tokenizer: what our GGUF writer reads for metadata and vocabulary."""
    from transformers import Qwen2Config

    from qwen_quant.calib import default_tokenizer_dir

    h, inter, heads, kv, layers, vocab = SHAPES[shape]
    d = tmp / f"random-{shape}"
    d.mkdir(parents=True, exist_ok=True)
    Qwen2Config(vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=32768, rope_theta=1e6,
                rms_norm_eps=1e-6, tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"]).save_pretrained(d)
    for f in Path(default_tokenizer_dir()).iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy(f, d / f.name)
    return d


def _random_tensors(shape: str, seed: int = 0):
    """(HF name, fp16 numpy) of a random Qwen2 of ``shape``, made on the GPU when there is one.

    Linear weights N(0, 0.02) like HF's init, with the residual-writing ones (o_proj, down_proj) scaled
    by 1/sqrt(2 x layers) (GPT-2's init) so 32 random layers do not amplify rounding differences
    chaotically; token embeddings N(0, 1), so the residual stream carries the token; norms 1, biases
    N(0, 0.02); lm_head N(0, 4/sqrt(hidden)) so the next-token distributions are peaked (logit std ~4),
    not flat: a flat distribution would make top-1 agreement a coin toss and hide a broken runtime.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    h, inter, heads, kv, layers, vocab = SHAPES[shape]
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=False)
    with torch.device("meta"):
        names = {k: tuple(v.shape) for k, v in Qwen2ForCausalLM(cfg).state_dict().items()}
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(seed)
    for name, shp in names.items():
        if name.endswith("norm.weight"):
            t = torch.ones(shp, dtype=torch.float16)
        else:
            std = 4.0 / math.sqrt(h) if name == "lm_head.weight" else 1.0 if name.endswith("embed_tokens.weight") \
                else 0.02 / math.sqrt(2 * layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            t = (torch.randn(shp, device=dev, generator=g, dtype=torch.float32) * std).half()
        yield name, t.cpu().numpy()


def make_f16(shape: str, out: Path) -> Path:
    """A float16 GGUF of a random ``shape`` model, written by our writer's metadata/vocab code."""
    import gguf

    from qwen_quant.export.gguf import add_metadata, add_vocab, gguf_arch, tensor_type
    from qwen_quant.models import QWEN2

    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        d = _model_dir(shape, Path(tmp))
        hp = json.loads((d / "config.json").read_text())  # no weights on disk: skip check_model
        writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf_arch(QWEN2)])
        name_map = gguf.get_tensor_name_map(gguf_arch(QWEN2), hp["num_hidden_layers"])
        for name, data in _random_tensors(shape):
            new = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
            qtype = tensor_type(new, data.ndim, "f16")
            writer.add_tensor(new, gguf.quants.quantize(data.astype(np.float32) if qtype.name == "F32" else data, qtype),
                              raw_dtype=qtype)
        add_metadata(writer, d, hp, "f16", QWEN2)
        add_vocab(writer, d, hp["vocab_size"], QWEN2)
        tmp_out = out.with_name(f".{out.name}.tmp")
        writer.write_header_to_file(path=tmp_out)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        os.replace(tmp_out, out)
    print(f"wrote {out} ({out.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f}s", flush=True)
    return out


def exact_model(gguf_path: Path, shape: str):
    """A float32 Qwen2ForCausalLM holding the dequantized weights of ``gguf_path``."""
    import gguf
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    h, inter, heads, kv, layers, vocab = SHAPES[shape]
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=32768,
                      rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, layers)
    to_hf = {name_map.get_name(n, try_suffixes=(".weight", ".bias")): n for n in model.state_dict()}
    state = {}
    for t in gguf.GGUFReader(str(gguf_path)).tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        state[to_hf[t.name]] = torch.from_numpy(w.reshape(model.state_dict()[to_hf[t.name]].shape))
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise SystemExit(f"not in the GGUF: {sorted(missing)[:4]}")
    model.load_state_dict(state, assign=True)
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    model.model.rotary_emb = Qwen2RotaryEmbedding(config=cfg)  # its buffers were made on the meta device
    return model.float().eval()


class Timed:
    """Wraps a backend and adds up the wall time and tokens of its scoring and greedy calls.

    It also keeps what the runtime returned (logits on the host, greedy tokens), so the rows can be
    scored against exact math afterwards by `Replay` without running llama.cpp a second time (on a
    7B, a second CPU pass would double the slowest part of the run).
    """

    def __init__(self, inner):
        self.inner = inner
        self.reset()

    def reset(self):
        self.score_s = self.greedy_s = 0.0
        self.score_tokens = self.greedy_tokens = 0
        self.recorded_logits, self.recorded_greedy = [], []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _score(self, fn, ids, *a, **kw):
        t = time.perf_counter()
        out = fn(ids, *a, **kw)
        self.score_s += time.perf_counter() - t
        self.score_tokens += int(np.asarray(ids).size)
        return out

    def logits(self, ids):
        return self._score(self.inner.logits, ids)

    def device_logits(self, ids, keep=None):
        out = self._score(self.inner.device_logits, ids, keep)
        self.recorded_logits.append(out.detach().cpu())
        return out

    def greedy(self, prompt, n):
        return self.greedy_batch([prompt], n)[0]

    def greedy_batch(self, prompts, n):
        t = time.perf_counter()
        out = [self.inner.greedy(p, n) for p in prompts]  # one at a time on both rows: comparable speed
        self.greedy_s += time.perf_counter() - t
        self.greedy_tokens += n * len(prompts)
        self.recorded_greedy.append(out)
        return out

    def speed(self) -> dict:
        return {"prompt_tokens_per_s": round(self.score_tokens / self.score_s, 1) if self.score_s else None,
                "decode_tokens_per_s": round(self.greedy_tokens / self.greedy_s, 2) if self.greedy_s else None,
                "score_s": round(self.score_s, 2), "greedy_s": round(self.greedy_s, 2)}


class Replay:
    """A row played back from what its `Timed` wrapper recorded, in the same call order `evaluate` makes."""

    def __init__(self, timed: Timed):
        self.inner = timed.inner
        self._logits, self._greedy = iter(timed.recorded_logits), iter(timed.recorded_greedy)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def device_logits(self, ids, keep=None):
        return next(self._logits)

    def logits(self, ids):
        return next(self._logits).float().numpy()

    def greedy(self, prompt, n):
        return self.greedy_batch([prompt], n)[0]

    def greedy_batch(self, prompts, n):
        return next(self._greedy)


class Garbage:
    """The Qwen2-on-CUDA failure: every position predicts the same token ("GGGG")."""

    def __init__(self, inner, token: int = 38):  # 38 is "G" in the Qwen2 vocabulary
        self.inner, self.token = inner, token

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def logits(self, ids):
        out = np.zeros((*np.asarray(ids).shape, self.inner.vocab_size), dtype=np.float32)
        out[..., self.token] = 30.0
        return out

    def device_logits(self, ids, keep=None):
        import torch

        out = torch.from_numpy(self.logits(ids))
        return out if keep is None else out[:, -keep:]

    def greedy(self, prompt, n):
        return [self.token] * n

    def greedy_batch(self, prompts, n):
        return [[self.token] * n for _ in prompts]


LIMITS = {"max_kl_mean": 0.05, "min_top1": 0.90, "max_ppl_dev": 0.05, "min_greedy_prefix_mean": 8.0}


def check_parity(m: dict, limits: dict = LIMITS) -> list[str]:
    """Why the CUDA row (metrics vs the CPU row) fails, or [] when it passes."""
    keys = ("perplexity", "ref_perplexity", "kl_mean", "top1_agreement")
    bad = [k for k in keys if not (isinstance(m.get(k), (int, float)) and math.isfinite(m[k]))]
    if bad:
        return [f"non-finite {', '.join(bad)} (NaN/inf logits: the fp16-overflow failure)"]
    why = []
    if m["kl_mean"] > limits["max_kl_mean"]:
        why.append(f"KL mean {m['kl_mean']:.4g} > {limits['max_kl_mean']}")
    if m["top1_agreement"] < limits["min_top1"]:
        why.append(f"top-1 agreement {m['top1_agreement']:.3f} < {limits['min_top1']}")
    if abs(m["perplexity"] / m["ref_perplexity"] - 1) > limits["max_ppl_dev"]:
        why.append(f"perplexity {m['perplexity']:.4g} vs CPU {m['ref_perplexity']:.4g} (> {limits['max_ppl_dev']:.0%} apart)")
    if "greedy_prefix_mean" in m and m["greedy_prefix_mean"] < limits["min_greedy_prefix_mean"]:
        why.append(f"greedy prefix mean {m['greedy_prefix_mean']:.1f} < {limits['min_greedy_prefix_mean']}")
    return why


EXACT_LIMITS = {"max_kl_ratio": 3.0, "kl_floor": 1e-3, "max_top1_drop": 0.05}


def check_vs_exact(test: dict, cpu: dict, limits: dict = EXACT_LIMITS) -> list[str]:
    """Why the CUDA row fails when both rows are scored against exact float32 math on the same weights.

    The CPU row's own distance from exact arithmetic is the yardstick: the CUDA row may be at most
    ``max_kl_ratio`` times as far in KL (or ``kl_floor``, whichever is larger) and lose at most
    ``max_top1_drop`` top-1 agreement more. Random weights make both runtimes noisy (bench/llamacpp_noise.py),
    so absolute limits between the two runtimes misjudge them; garbage ("GGGG", NaN) fails either way.
    """
    bad = [k for k in ("kl_mean", "top1_agreement", "perplexity") if not math.isfinite(float(test.get(k, float("nan"))))]
    if bad:
        return [f"non-finite {', '.join(bad)} vs exact (NaN/inf logits: the fp16-overflow failure)"]
    why = []
    kl_cap = max(limits["max_kl_ratio"] * cpu["kl_mean"], limits["kl_floor"])
    if test["kl_mean"] > kl_cap:
        why.append(f"KL vs exact {test['kl_mean']:.4g} > {kl_cap:.4g} ({limits['max_kl_ratio']:g}x the CPU row's "
                   f"{cpu['kl_mean']:.4g})")
    if test["top1_agreement"] < cpu["top1_agreement"] - limits["max_top1_drop"]:
        why.append(f"top-1 vs exact {test['top1_agreement']:.3f} < CPU row's {cpu['top1_agreement']:.3f} - "
                   f"{limits['max_top1_drop']}")
    return why


def run(args) -> int:
    from qwen_quant.backends.llamacpp import LlamaCppBackend
    from qwen_quant.calib import dataset_fingerprint, default_tokenizer_dir, eval_tokens, greedy_prompts
    from qwen_quant.export.gguf_quant import quantize_gguf
    from transformers import AutoTokenizer
    from qwen_quant.report import Report, Result
    from qwen_quant.validate import EvalConfig, artifact_record, backend_record, evaluate, greedy

    threads = args.threads or os.cpu_count() or 1
    q = Path(args.f16).with_name(f"model-{args.qtype}.gguf")
    t = time.perf_counter()
    quantize_gguf(Path(args.f16), q, args.qtype, nthread=threads)
    quant_s = round(time.perf_counter() - t, 1)
    print(f"quantized to {args.qtype}: {q.stat().st_size / 2**30:.2f} GiB in {quant_s:.1f}s", flush=True)

    tok = AutoTokenizer.from_pretrained(str(default_tokenizer_dir()))
    tokens = np.asarray(eval_tokens(tok, "shipped", max_tokens=args.tokens), dtype=np.int64)
    prompts = [ids for _, ids in greedy_prompts(tok)][: args.prompts]
    cfg = EvalConfig(ctx=args.ctx, greedy_tokens=args.greedy_tokens)
    gpu_dev = "cuda" if args.cuda else "cpu"

    t = time.perf_counter()
    test = LlamaCppBackend(q, device=gpu_dev, n_ctx=args.ctx, n_threads=threads,
                           llama_kwargs=json.loads(args.llama_kw) if args.llama_kw else None)
    load_gpu = time.perf_counter() - t
    t = time.perf_counter()
    ref = LlamaCppBackend(q, device="cpu", n_ctx=args.ctx, n_threads=threads)
    load_cpu = time.perf_counter() - t
    tb, rb = Timed(Garbage(test) if args.inject_garbage else test), Timed(ref)
    try:
        for b in (tb, rb):  # warm-up: first call allocates buffers (and uploads CUDA graphs)
            b.logits(tokens[None, : args.ctx])
            b.reset()
        m = evaluate(tb, tokens, cfg, rb, prompts)
        vs_exact = {}
        if args.exact:  # both rows against float32 math on the dequantized weights (GPU when there is one)
            import torch

            from qwen_quant.backends.torch_backend import TorchBackend

            t = time.perf_counter()
            dev = "cuda" if torch.cuda.is_available() else "cpu"
            exact = TorchBackend(exact_model(q, args.shape).to(dev), device=dev)
            print(f"exact float32 model built on {dev} in {time.perf_counter() - t:.1f}s", flush=True)
            keep = ("kl_mean", "kl_p99", "top1_agreement", "perplexity", "ref_perplexity", "greedy_exact",
                    "greedy_prefix_mean")
            exact_greedy = greedy(exact, prompts, cfg) if prompts and cfg.greedy_tokens > 0 else None  # decoded once
            for label, b in (("test", tb), ("cpu", rb)):  # replayed: llama.cpp does not run again
                em = evaluate(Replay(b), tokens, cfg, exact, prompts, ref_greedy=exact_greedy)
                vs_exact[label] = {k: em[k] for k in keep if k in em}
                print(f"{label} row scored against exact math ({time.perf_counter() - t:.1f}s)", flush=True)
            vs_exact["seconds"] = round(time.perf_counter() - t, 1)
            vs_exact["device"] = dev
            del exact
        rows = [("cuda" if args.cuda else "cpu-as-test", test, tb, m, load_gpu),
                ("cpu", ref, rb, {"tokens_scored": m["tokens_scored"], "perplexity": m["ref_perplexity"]}, load_cpu)]
        ds = {"name": "shipped", "sha256": dataset_fingerprint(tokens), "n_tokens": int(len(tokens))}
        report = Report()
        for label, be, timed, metrics, load_s in rows:
            report.results.append(Result(
                artifact=artifact_record(q, type_=args.qtype), backend=backend_record(be), dataset=ds, ctx=args.ctx,
                ppl_method=cfg.method, metrics=metrics, wall_time_s=round(load_s + timed.score_s + timed.greedy_s, 2),
                reference=({"path": str(q), "backend": "llama.cpp", "device": "cpu", "dtype": args.qtype}
                           if label != "cpu" else None),
                phases={"load": round(load_s, 2), "scoring": timed.score_s, "greedy": timed.greedy_s},
                extra={"row": label, **timed.speed(),
                       **({"vs_exact": vs_exact["test" if label != "cpu" else "cpu"]} if vs_exact else {})}))
    finally:
        test.close()
        ref.close()
    absolute = check_parity(m)
    # with the exact reference, the verdict is relative to the CPU row's own distance from exact math;
    # without it, the absolute CUDA-vs-CPU limits decide
    why = check_vs_exact(vs_exact["test"], vs_exact["cpu"]) if vs_exact else absolute
    report.extra = {"bench": "llamacpp_cuda", "shape": args.shape, "qtype": args.qtype, "threads": threads,
                    "build_seconds": args.build_seconds, "quantize_seconds": quant_s,
                    "limits": LIMITS, "parity_ok": not why, "parity_failures": why,
                    "verdict": "vs-exact" if vs_exact else "absolute",
                    **({"exact_limits": EXACT_LIMITS, "absolute_failures": absolute,
                        "exact_seconds": vs_exact["seconds"], "exact_device": vs_exact["device"]} if vs_exact else {}),
                    "inject_garbage": bool(args.inject_garbage), "gpu": _gpu_name(),
                    "llama_kw": args.llama_kw, "env": {k: v for k, v in os.environ.items() if k.startswith("GGML_")}}
    if args.json:
        report.write_json(args.json)
    for r in report.results:
        e = r.extra
        print(f"{e['row']:>11}  {r.backend['device']:>4}  ppl {r.metrics['perplexity']:.4f}  "
              f"prompt {e['prompt_tokens_per_s']} tok/s  decode {e['decode_tokens_per_s']} tok/s  load {r.phases['load']:.1f}s")
    print(f"CUDA vs CPU: KL mean {m['kl_mean']:.3g}  p99 {m['kl_p99']:.3g}  top-1 {m['top1_agreement']:.4f}  "
          f"greedy exact {m.get('greedy_exact')}/{m.get('greedy_prompts')}")
    for label in ("test", "cpu") if vs_exact else ():
        x = vs_exact[label]
        print(f"{label:>4} vs exact float32: KL mean {x['kl_mean']:.3g}  top-1 {x['top1_agreement']:.4f}  "
              f"greedy exact {x.get('greedy_exact')}")
    if args.json:
        print("\n" + table(args.json) + "\n")
    if why:
        print("PARITY FAILED: " + "; ".join(why), file=sys.stderr)
        return 1
    print("parity ok")
    return 0


def _gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - the report just leaves it out
        return None


def table(path: str) -> str:
    """The docs/benchmarks.md section for a report written by ``run --json``."""
    rep = json.loads(Path(path).read_text())
    e, rows = rep["extra"], {r["extra"]["row"]: r for r in rep["results"]}
    test = next(r for k, r in rows.items() if k != "cpu")
    m = test["metrics"]
    built = (f"built there with CUDA in {e['build_seconds']:.0f} s" if e.get("build_seconds")
             else "CUDA build unpacked from an earlier call's prebuilt copy")
    quant = (f"quantized in {e['quantize_seconds']} s" if e.get("quantize_seconds")
             else "quantized earlier in the call")  # the first 7B result was quantized by a diagnosis script
    out = [f"Device: {e.get('gpu') or 'CPU only'}, llama-cpp-python {test['backend']['versions'].get('llama_cpp_python')} "
           f"{built}; {e['shape']}-shaped random model, {e['qtype']} "
           f"({quant}), {e['threads']} CPU threads, ctx {test['ctx']}, "
           f"{m['tokens_scored']} scored tokens, {m.get('greedy_prompts')} prompts x {m.get('greedy_tokens')} greedy tokens.",
           "", "| row | device | prompt tokens/s | decode tokens/s | load s | perplexity |", "|---|---|---|---|---|---|"]
    for label, r in rows.items():
        x = r["extra"]
        out.append(f"| llama.cpp {label} | {r['backend']['device']} | {x['prompt_tokens_per_s']} | {x['decode_tokens_per_s']} | "
                   f"{r['phases']['load']} | {r['metrics']['perplexity']:.6g} |")
    out += ["", f"CUDA vs CPU (same GGUF): KL mean {m['kl_mean']:.3g}, p99 {m['kl_p99']:.3g}, max {m['kl_max']:.3g}; "
            f"top-1 agreement {m['top1_agreement']:.4f}; greedy exact {m.get('greedy_exact')}/{m.get('greedy_prompts')}, "
            f"prefix mean {m.get('greedy_prefix_mean')}; perplexity ratio {m['perplexity'] / m['ref_perplexity']:.5f}. "
            f"Absolute limits ({', '.join(f'{k} {v}' for k, v in e['limits'].items())}): "
            f"{'passed' if not e.get('absolute_failures', e['parity_failures']) else 'exceeded: ' + '; '.join(e.get('absolute_failures', e['parity_failures']))}."]
    if e.get("verdict") == "vs-exact":
        vx = {k: r["extra"]["vs_exact"] for k, r in rows.items()}
        out += ["", "Against exact float32 math on the same dequantized weights (" + e["exact_device"] + "): "
                + "; ".join(f"{k} row KL mean {x['kl_mean']:.3g}, top-1 {x['top1_agreement']:.4f}, greedy exact "
                            f"{x.get('greedy_exact')}" for k, x in vx.items())
                + f". Verdict vs exact ({', '.join(f'{k} {v}' for k, v in e['exact_limits'].items())}): "
                + ("passed" if e["parity_ok"] else "FAILED: " + "; ".join(e["parity_failures"])) + "."]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-f16")
    mk.add_argument("--out", required=True)
    for sp in (mk, sub.add_parser("run"), sub.add_parser("smoke")):
        sp.add_argument("--shape", default="qwen1.5-7b", choices=sorted(SHAPES))
        if sp is mk:
            continue
        sp.add_argument("--qtype", default="q4_k_m")
        sp.add_argument("--ctx", type=int, default=512)
        sp.add_argument("--tokens", type=int, default=4096, help="evaluation tokens (windows of --ctx)")
        sp.add_argument("--prompts", type=int, default=4)
        sp.add_argument("--greedy-tokens", type=int, default=32)
        sp.add_argument("--threads", type=int, default=0)
        sp.add_argument("--json")
        sp.add_argument("--inject-garbage", action="store_true", help="replace the CUDA row by constant 'GGGG' output")
        sp.add_argument("--build-seconds", type=float)
        sp.add_argument("--no-exact", dest="exact", action="store_false",
                        help="skip scoring both rows against float32 math on the dequantized weights")
        sp.add_argument("--llama-kw", help="JSON of extra llama_cpp.Llama arguments for the CUDA row")
        sp.add_argument("--cpu-only", dest="cuda", action="store_false", help="both rows on the CPU (no CUDA build)")
        if sp.prog.endswith("run"):
            sp.add_argument("--f16", required=True)
    sub.add_parser("table", help="print the docs/benchmarks.md section of a --json report").add_argument("report")
    a = p.parse_args(argv)
    if a.cmd == "table":
        print(table(a.report))
        return 0
    if a.cmd == "make-f16":
        make_f16(a.shape, Path(a.out))
        return 0
    if a.cmd == "smoke":  # tiny model, both rows on the CPU (the CUDA row falls back to CPU), seconds
        a.shape, a.cuda = "tiny", False
        a.ctx, a.tokens, a.prompts, a.greedy_tokens = min(a.ctx, 128), min(a.tokens, 256), min(a.prompts, 2), min(a.greedy_tokens, 8)
        with tempfile.TemporaryDirectory() as tmp:
            a.f16 = str(make_f16("tiny", Path(tmp) / "model-f16.gguf"))
            return run(a)
    return run(a)


if __name__ == "__main__":
    sys.exit(main())
