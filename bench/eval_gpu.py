"""Benchmark: validation at the seeds' scale, with random weights on one GPU.

Part ``7b`` (Qwen1.5-7B shape, 32 layers, bf16): the reference and the artifact (a copy of the
reference with Gaussian noise of 5% of each weight's std added: same shape and cost as any artifact
measured dense) are built directly on the GPU, so weight loading is not part of it. Measured in the
same call: teacher-forced scoring of both models over ``--tokens`` tokens at ``--ctx`` (KL, top-1,
both perplexities, on the device), greedy parity over ``--prompts`` x ``--greedy`` tokens (one batch),
and the raw bf16 forward throughput of the two models over the same windows (decoder + lm_head on
the scored half, which is what any scorer must compute; and decoder + one position, the bare floor).

Part ``split`` (2 GPUs): the 7B-shaped reference written to disk, loaded split over ``--device
cuda:0,1`` (accelerate places whole layers) and on one GPU; greedy tokens of both must be equal.

Part ``72b`` (Qwen2-72B layer shape, streamed): ``--layers`` decoder layers of a reference and of an
artifact (the same 5%-noise bf16 copy, written as its own checkpoint) are written to disk, then
`evaluate_streamed` runs over ``--tokens`` tokens; per-layer wall time and peak GPU memory are
recorded and extrapolated to 80 layers (every layer has the same shape: time is embed + head + 80 x
the median layer; peak memory does not grow with depth, as only the current layers are resident).
The files were just written, so reads come mostly from the page cache; a cold disk adds its read time.

    python bench/eval_gpu.py --part 7b --out $OUT/eval-7b.json
    python bench/eval_gpu.py --part 72b --layers 10 --out $OUT/eval-72b.json
    python bench/eval_gpu.py --part split --device cuda:0,1 --out $OUT/eval-split.json   # 2 GPUs
    python bench/eval_gpu.py --smoke          # tiny shapes on the CPU, both parts, < 1 min
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    # name: (hidden, intermediate, heads, kv_heads, vocab, full depth)
    "qwen1.5-7b": (4096, 11008, 32, 32, 151936, 32),
    "qwen2-72b": (8192, 29568, 64, 8, 152064, 80),
    "tiny": (64, 176, 4, 2, 1024, 4),
}
NOISE = 0.05


def config(shape: str, layers: int):
    from transformers import Qwen2Config

    h, inter, heads, kv, vocab, _ = SHAPES[shape]
    return Qwen2Config(vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=32768,
                       rope_theta=1e6, tie_word_embeddings=False)


def _rand(shape, name: str, g: torch.Generator, device: str, dtype) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, device=device, dtype=dtype)
    std = 0.02 if len(shape) == 2 else 0.01
    return (torch.randn(shape, device=device, generator=g, dtype=torch.float32) * std).to(dtype)


def _noisy(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    if t.dim() < 2:
        return t.clone()
    n = torch.randn(t.shape, device=t.device, generator=g, dtype=torch.float32)
    return (t.float() + n * (NOISE * t.float().std())).to(t.dtype)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def part_7b(a, device: str, dtype) -> dict:
    """Whole-model eval of ref + artifact, built in GPU memory; raw forward throughput alongside."""
    from transformers import Qwen2ForCausalLM

    from qwen_quant.backends.torch_backend import TorchBackend
    from qwen_quant.validate import EvalConfig, evaluate

    cfg = config(a.shape, a.layers)
    t0 = time.perf_counter()
    g = torch.Generator(device=device).manual_seed(0)
    models = []
    for k in range(2):
        with torch.device("meta"):
            m = Qwen2ForCausalLM(cfg)
        sd = {}
        for name, p in m.state_dict().items():
            sd[name] = _rand(p.shape, name, g, device, dtype) if k == 0 else _noisy(models[0].state_dict()[name], g)
        m.load_state_dict(sd, assign=True)
        m.model.rotary_emb = type(m.model.rotary_emb)(config=cfg).to(device)
        models.append(m.to(device).eval())
    sync(device)
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, a.tokens).astype(np.int64)
    prompts = [rng.integers(0, cfg.vocab_size, int(rng.integers(16, 64))).tolist() for _ in range(a.prompts)]
    ecfg = EvalConfig(ctx=a.ctx, greedy_tokens=a.greedy, batch_size=a.batch_size)
    test, ref = TorchBackend(models[1], device=device), TorchBackend(models[0], device=device)
    evaluate(test, tokens[: a.ctx * 2], EvalConfig(ctx=a.ctx, greedy_tokens=2), ref, prompts[:2])  # warm-up (kernels, allocator)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    phases: dict = {}
    t0 = time.perf_counter()
    metrics = evaluate(test, tokens, ecfg, ref, prompts, phases)
    sync(device)
    total = time.perf_counter() - t0
    scored = metrics["tokens_scored"]
    n_windows = len(tokens) // a.ctx
    bs = ecfg.windows_per_batch(device)
    raw = {}
    with torch.inference_mode():
        for label, keep in (("scored_half", a.ctx - a.ctx // 2), ("one_position", 1)):
            sync(device)
            t = time.perf_counter()
            for m in models:
                for b in range(0, n_windows, bs):
                    ids = torch.as_tensor(tokens[b * a.ctx:(b + bs) * a.ctx].reshape(-1, a.ctx), device=device)
                    m(input_ids=ids, use_cache=False, logits_to_keep=keep)
            sync(device)
            raw[label] = n_windows * a.ctx / (time.perf_counter() - t)  # tokens/s through both models
    fed = n_windows * a.ctx  # tokens fed through each model while scoring
    scoring_tps = fed / phases["scoring"]
    return {
        "part": "7b", "shape": a.shape, "layers": a.layers, "dtype": str(dtype), "ctx": a.ctx, "tokens": int(len(tokens)),
        "windows": n_windows, "windows_per_batch": bs, "tokens_scored": scored, "prompts": a.prompts, "greedy_tokens": a.greedy,
        "artifact": f"reference + Gaussian noise ({NOISE} x std per weight), bf16, built in GPU memory",
        "build_s": round(build_s, 2), "phases_s": phases, "eval_total_s": round(total, 3),
        "scoring_tokens_per_s": round(scoring_tps, 1),
        "raw_forward_tokens_per_s": {k: round(v, 1) for k, v in raw.items()},
        "scoring_vs_raw": {k: round(scoring_tps / v, 3) for k, v in raw.items()},
        "target": {"eval_total_s_max": 30, "scoring_vs_raw_min": 0.40},
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None,
        "metrics": metrics,
    }


def write_checkpoint(out: Path, cfg, g, device: str, dtype, base: Path | None = None) -> Path:
    """A sharded bf16 checkpoint, one shard per layer; with ``base``, a noisy copy of that checkpoint."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        names = {k: v.shape for k, v in Qwen2ForCausalLM(cfg).state_dict().items()}
    groups: dict[str, list[str]] = {}
    for k in names:
        parts = k.split(".")
        key = f"layer{int(parts[2]):03d}" if parts[:2] == ["model", "layers"] else parts[-2] if "embed" in k or "lm_head" in k else "norm"
        groups.setdefault(key, []).append(k)
    out.mkdir(parents=True, exist_ok=True)
    wmap = {}
    src = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"] if base else None
    for key, ks in groups.items():
        fname = f"{key}.safetensors"
        sd = {}
        for k in ks:
            if base is None:
                t = _rand(names[k], k, g, device, dtype)
            else:
                with safe_open(str(base / src[k]), "pt", device="cpu") as h:
                    t = _noisy(h.get_tensor(k).to(device), g)
            sd[k] = t.cpu()
        save_file(sd, str(out / fname), metadata={"format": "pt"})
        wmap.update({k: fname for k in ks})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    d = cfg.to_dict()
    d["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(d))
    return out


def part_72b(a, device: str, dtype) -> dict:
    from qwen_quant.validate import EvalConfig
    from qwen_quant.validate.streamed import evaluate_streamed

    cfg = config(a.shape, a.layers)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="eval72b-"))
    g = torch.Generator(device=device).manual_seed(0)
    t0 = time.perf_counter()
    ref = write_checkpoint(work / "ref", cfg, g, device, dtype)
    art = write_checkpoint(work / "art", cfg, g, device, dtype, base=ref)
    write_s = time.perf_counter() - t0
    disk = sum(f.stat().st_size for f in work.rglob("*.safetensors"))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, a.tokens).astype(np.int64)
    ecfg = EvalConfig(ctx=a.ctx, batch_size=a.batch_size)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    phases, stats = {}, {}
    t0 = time.perf_counter()
    metrics = evaluate_streamed(art, ref, tokens, ecfg, device=device, dtype=dtype, phases=phases, stats=stats)
    total = time.perf_counter() - t0
    layer = statistics.median(stats["layer_s"])
    full = SHAPES[a.shape][5]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "part": "72b-streamed", "shape": a.shape, "layers_built": a.layers, "dtype": str(dtype), "ctx": a.ctx,
        "tokens": int(len(tokens)), "tokens_scored": metrics["tokens_scored"],
        "artifact": f"reference + Gaussian noise ({NOISE} x std per weight), written as a second checkpoint in the compute dtype",
        "checkpoint_bytes_on_disk": disk, "write_s": round(write_s, 1), "eval_total_s": round(total, 2), "phases_s": phases,
        "embed_s": round(stats["embed_s"], 3), "head_s": round(stats["head_s"], 3),
        "layer_s": [round(x, 3) for x in stats["layer_s"]], "layer_s_median": round(layer, 3),
        "peak_gpu_gib": None if peak is None else round(peak, 2),
        "extrapolated": {"layers": full, "eval_s": round(stats["embed_s"] + stats["head_s"] + full * layer, 1),
                         "peak_gpu_gib": None if peak is None else round(peak, 2),
                         "fits_80gb": None if peak is None else peak < 78},
        "page_cache_note": "layers were read right after being written (page cache); a cold disk adds its read time",
        "metrics": metrics,
    }


def part_split(a, device: str, dtype) -> dict:
    """Greedy parity with each model split over two devices (``--device cuda:0,1``) equals one device."""
    from qwen_quant.backends.torch_backend import TorchBackend

    cfg = config(a.shape, a.layers)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="evalsplit-"))
    g = torch.Generator(device=device.split(",")[0]).manual_seed(0)
    ref = write_checkpoint(work / "ref", cfg, g, device.split(",")[0], dtype)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, int(rng.integers(16, 64))).tolist() for _ in range(a.prompts)]
    out = {}
    for where in (device.split(",")[0], device):
        t0 = time.perf_counter()
        b = TorchBackend(ref, device=where, dtype=str(dtype).replace("torch.", ""))
        load = time.perf_counter() - t0
        placement = sorted({str(p.device) for p in b.model.parameters()})
        t0 = time.perf_counter()
        toks = b.greedy_batch(prompts, a.greedy)
        out[where] = {"load_s": round(load, 2), "greedy_s": round(time.perf_counter() - t0, 3), "devices_used": placement, "tokens": toks}
        b.close()
    one, split = out[device.split(",")[0]], out[device]
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return {"part": "split-greedy", "shape": a.shape, "layers": a.layers, "device": device,
            "single": {k: v for k, v in one.items() if k != "tokens"}, "split": {k: v for k, v in split.items() if k != "tokens"},
            "identical_tokens": one["tokens"] == split["tokens"],
            "prefix_match_mean": float(np.mean([next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), len(p))
                                                for p, q in zip(one["tokens"], split["tokens"])]))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("7b", "72b", "both", "split"), default="7b",
                    help="split: greedy with the 7B shape split over --device cuda:0,1 vs one GPU (needs 2 GPUs)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (both parts): checks the bench runs")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers to build (7b: 32, 72b: 10)")
    ap.add_argument("--tokens", type=int, default=49152)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--greedy", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=0, help="windows per forward (0: automatic)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the 72b checkpoints")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args()

    from qwen_quant.progress import set_quiet

    set_quiet(True)
    dtype = torch.float32 if a.device == "cpu" else torch.bfloat16
    parts = ["7b", "72b"] if a.part == "both" or a.smoke else [a.part]
    results = []
    for part in parts:
        b = argparse.Namespace(**vars(a))
        if a.smoke:
            b.shape, b.layers, b.tokens, b.ctx, b.prompts, b.greedy = "tiny", 2, 1024, 128, 3, 8
        else:
            b.shape = "qwen2-72b" if part == "72b" else "qwen1.5-7b"
            b.layers = a.layers or (10 if part == "72b" else 32)
        r = {"7b": part_7b, "72b": part_72b, "split": part_split}[part](b, a.device, dtype)
        r["gpu"] = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
        r["torch"] = torch.__version__
        results.append(r)
        print(json.dumps(r, indent=2, default=str), flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(results if len(results) > 1 else results[0], indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
