"""Benchmark: GPTQ int4 g128 on Qwen3-MoE layer shapes on one GPU, ours beside llm-compressor 0.14.

A random checkpoint of ``--layers`` decoder layers is built with transformers' ``Qwen3MoeForCausalLM``
(its own init, saved by ``save_pretrained``, so experts are per expert on disk as in Qwen's releases)
and quantized from the same calibration ids (drawn once from the shipped data, seed 0) by:

- ours: ``quantize_model(GPTQConfig(...))`` (true-sequential, routed expert Hessians, the experts of
  a layer solved as one batch), timed around the call including the checkpoint write; per-layer
  phases and peak GPU memory from ``qwen-quant-quantize.json``;
- llm-compressor 0.14: ``oneshot`` with ``GPTQModifier(scheme="W4A16", ignore=["lm_head",
  "re:.*mlp.gate$"])``, ``model.config.dtype`` set to a torch dtype first (its MoE calibration module
  fails on a string), timed around ``oneshot`` with the model already loaded, no save; steady
  per-layer time from the intervals between its ``sequential_epoch_end`` events.

Each tool runs in its own subprocess of this call (``--side``), so imports never mix and each peak
is its own (``--peer-path`` goes first on the peer's PYTHONPATH). Per tool: seconds per layer (wall /
layers built), steady seconds per layer (mean after the first layer), and full model = fixed +
depth x steady with fixed = wall - layers x steady (48 layers for Qwen3-30B-A3B, 94 for 235B).

Shapes (``--shape``): ``30b`` Qwen3-30B-A3B (hidden 2048, 128 experts of 768, top-8, 32 heads / 4 KV,
head_dim 128); ``235b`` Qwen3-235B-A22B (hidden 4096, 128 experts of 1536, top-8, 64 heads / 4 KV):
ours only, one layer by default. ``--tiny``: a tiny shape on the CPU, both sides where the peer imports.

    python bench/moe_gpu.py --layers 2 --peer-path /path/to/llmcompressor-site --out bench/results/moe-gpu-30b-h200.json
    python bench/moe_gpu.py --shape 235b --out bench/results/moe-gpu-235b-h200.json
    python bench/moe_gpu.py --tiny --out /tmp/moe-tiny.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    # name: (hidden, experts, moe_intermediate, top_k, heads, kv_heads, head_dim, full depth)
    "30b": (2048, 128, 768, 8, 32, 4, 128, 48),
    "235b": (4096, 128, 1536, 8, 64, 4, 128, 94),
    "tiny": (128, 8, 128, 2, 4, 2, 32, 48),
}


def build(shape: str, layers: int, out: Path, device: str) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from qwen_quant.calib import default_tokenizer_dir

    h, e, inter, k, heads, kv, hd, _ = SHAPES[shape]
    dtype = torch.float16 if device == "cuda" else torch.float32
    cfg = Qwen3MoeConfig(vocab_size=151936, hidden_size=h, intermediate_size=4 * inter, moe_intermediate_size=inter,
                         num_experts=e, num_experts_per_tok=k, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, head_dim=hd, norm_topk_prob=True, decoder_sparse_step=1,
                         mlp_only_layers=[], max_position_embeddings=40960, rope_theta=1e6, tie_word_embeddings=False,
                         bos_token_id=151643, eos_token_id=151645)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3MoeForCausalLM(cfg).to(dtype)  # transformers' own init (normal, std 0.02)
    model.config.dtype = str(dtype).replace("torch.", "")
    model.save_pretrained(str(out))
    del model
    AutoTokenizer.from_pretrained(str(default_tokenizer_dir())).save_pretrained(str(out))
    return out


def steady(per_layer: list[float], wall: float, layers: int, depth: int) -> dict:
    st = sum(per_layer[1:]) / (len(per_layer) - 1) if len(per_layer) > 1 else (per_layer[0] if per_layer else wall / layers)
    fixed = max(wall - layers * st, 0.0)
    return {"seconds_per_layer": round(wall / layers, 2), "steady_seconds_per_layer": round(st, 2),
            "full_model_seconds": round(fixed + depth * st, 1), "full_model_minutes": round((fixed + depth * st) / 60, 1)}


def our_side(src: str, out: str, nsamples: int, seqlen: int, device: str) -> dict:
    import torch

    from qwen_quant.calib import CalibConfig
    from qwen_quant.progress import set_quiet
    from qwen_quant.quantize import GPTQConfig, quantize_model

    set_quiet(True)
    cfg = GPTQConfig(model=src, output=out, bits=4, group_size=128, device=device, phases=True, force=True,
                     calib=CalibConfig(nsamples=nsamples, seqlen=seqlen), validate=False)
    t0 = time.perf_counter()
    _, report = quantize_model(cfg)
    wall = time.perf_counter() - t0
    s = report.extra["quantize"]
    return {"seconds_with_tokenizer": round(wall, 2), "seconds": s["seconds"],
            "per_layer": [p["seconds"] for p in s["layers"]], "phases": [p.get("phases") for p in s["layers"]],
            "peak_gpu_gib": round(s["peak_gpu_bytes"] / 2**30, 2) if s["peak_gpu_bytes"] else None,
            "peak_rss_gib": round(s["peak_rss_bytes"] / 2**30, 2), "mean_rel_error": [p["mean_rel_error"] for p in s["layers"]],
            "routed_tokens_layer0": next(iter(s["moe"]["routed_tokens"].values()), None),
            "fallback_rtn": len(s["moe"]["fallback_rtn"]), "torch": torch.__version__}


def peer_side(src: str, calib: str, device: str) -> dict:
    import numpy as np
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.core import LifecycleCallbacks
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not torch.cuda.is_available():  # pinning needs an accelerator (see bench/peer_llmcompressor.py)
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *a, **k: None
    ids = np.load(calib)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist()})
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    model.config.dtype = dtype  # a torch dtype, not a string, or the MoE linearisation fails
    tok = AutoTokenizer.from_pretrained(src)
    recipe = [GPTQModifier(scheme="W4A16", ignore=["lm_head", "re:.*mlp.gate$"])]
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
    wall = time.perf_counter() - t0
    import llmcompressor

    layers = model.config.num_hidden_layers
    gaps = [b - a for a, b in zip([t0] + marks, marks)][:layers]
    return {"seconds": round(wall, 2), "per_layer": [round(g, 2) for g in gaps],
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
            "llmcompressor": llmcompressor.__version__, "recipe": [repr(m) for m in recipe]}


def _sub(args: list[str], pythonpath: str | None) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, str(ROOT), env.get("PYTHONPATH", "")])
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        res = Path(f.name)
    p = subprocess.run([sys.executable, __file__, *args, "--result", str(res)], env=env, capture_output=True, text=True)
    if p.returncode != 0 or not res.stat().st_size:
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-1:] or [f"exit {p.returncode}"]}
    return json.loads(res.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="30b", choices=("30b", "235b"))
    ap.add_argument("--tiny", action="store_true", help="a tiny shape on the CPU (checks the script)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers built (default 2; 1 for 235b)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--no-peer", action="store_true", help="ours only")
    ap.add_argument("--peer-path", default=None, help="put first on llm-compressor's PYTHONPATH")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None, help="write the results JSON here")
    ap.add_argument("--side", choices=("ours", "peer"), help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--calib", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    shape = "tiny" if a.tiny else a.shape
    device = "cpu" if a.tiny else "cuda"
    if a.tiny:
        a.nsamples, a.seqlen = min(a.nsamples, 8), min(a.seqlen, 128)
    if a.side:  # one tool, in its own process
        res = our_side(a.src, a.src + "-ours", a.nsamples, a.seqlen, device) if a.side == "ours" else peer_side(a.src, a.calib, device)
        Path(a.result).write_text(json.dumps(res))
        return 0

    import numpy as np

    from qwen_quant.calib import CalibConfig
    from qwen_quant.models import load_tokenizer

    layers = a.layers or (1 if shape == "235b" else 2)
    depth = SHAPES[shape][-1]
    work = Path(a.workdir or tempfile.mkdtemp(prefix="moe-bench-"))
    t0 = time.perf_counter()
    src = build(shape, layers, work / f"qwen3-moe-{shape}", device)
    build_s = time.perf_counter() - t0
    ids = CalibConfig(nsamples=a.nsamples, seqlen=a.seqlen).samples(load_tokenizer(src))
    np.save(work / "calib.npy", ids.numpy())
    common = ["--src", str(src), "--calib", str(work / "calib.npy"), "--nsamples", str(a.nsamples),
              "--seqlen", str(a.seqlen)] + (["--tiny"] if a.tiny else [])
    ours = _sub(["--side", "ours", *common], None)
    if "seconds" in ours:
        ours.update(steady(ours["per_layer"], ours["seconds"], layers, depth))
    peer = {"skipped": "ours only for this shape"} if shape == "235b" or a.no_peer else _sub(["--side", "peer", *common], a.peer_path)
    if "seconds" in peer:
        peer.update(steady(peer["per_layer"], peer["seconds"], layers, depth))
    h, e, inter, k, heads, kv, hd, _ = SHAPES[shape]
    res = {"shape": shape, "hidden": h, "experts": e, "moe_intermediate": inter, "top_k": k, "heads": heads, "kv_heads": kv,
           "head_dim": hd, "layers_built": layers, "full_depth": depth, "nsamples": a.nsamples, "seqlen": a.seqlen,
           "scheme": "int4 g128 symmetric (GPTQ)", "device": device, "build_seconds": round(build_s, 1),
           "ours": ours, "llmcompressor": peer}
    if "full_model_seconds" in ours and "full_model_seconds" in peer:
        res["ratio_full_model"] = round(ours["full_model_seconds"] / peer["full_model_seconds"], 3)
    try:
        import torch

        res["gpu"] = torch.cuda.get_device_name(0) if device == "cuda" else None
    except Exception:  # noqa: BLE001 - the name is informative only
        res["gpu"] = None
    text = json.dumps(res, indent=2)
    if a.out:
        Path(a.out).write_text(text)
    print(text)
    return 0 if "seconds" in ours else 1


if __name__ == "__main__":
    sys.exit(main())
