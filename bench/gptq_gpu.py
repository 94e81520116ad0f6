"""Benchmark: GPTQ on Qwen-7B/72B-shaped models (random weights) on one GPU: time and peak memory per layer.

Random weights are fine here: only speed and memory are measured (quality is measured on trained
fixtures in the tests). A documented subset of layers is built (every decoder layer of a model has
the same shape, so per-layer figures extrapolate linearly to the full depth).

    python bench/gptq_gpu.py --shape qwen1.5-7b --layers 4 --nsamples 128 --seqlen 1024 --out bench-out.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    # name: (hidden, intermediate, heads, kv_heads, vocab, tied, full depth)
    "qwen1.5-7b": (4096, 11008, 32, 32, 151936, False, 32),
    "qwen2-7b": (3584, 18944, 28, 4, 152064, False, 28),
    "qwen2-72b": (8192, 29568, 64, 8, 152064, False, 80),
    "qwen1.5-72b": (8192, 24576, 64, 64, 152064, False, 80),
}


def build(shape: str, layers: int, out: Path, tokenizer: Path) -> Path:
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    h, inter, heads, kv, vocab, tied, _ = SHAPES[shape]
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=32768,
                      rope_theta=1e6, tie_word_embeddings=tied, dtype="float16")
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    g = torch.Generator(device="cuda").manual_seed(0)
    sd = {}
    for k, v in model.state_dict().items():
        t = torch.randn(v.shape, device="cuda", generator=g, dtype=torch.float16) * (0.02 if v.dim() == 2 else 0.01)
        if k.endswith("norm.weight"):
            t = torch.ones_like(t)
        sd[k] = t.cpu()
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(str(out))
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer / f).exists():
            shutil.copy(tokenizer / f, out / f)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen1.5-7b", choices=SHAPES)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--out", default="bench-gptq.json")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--no-true-sequential", action="store_true", help="capture all linears of a layer in one pass")
    a = ap.parse_args()

    import transformers

    from qwen_quant.calib import CalibConfig, default_tokenizer_dir
    from qwen_quant.progress import set_quiet
    from qwen_quant.quantize import GPTQConfig, quantize_model

    set_quiet(True)
    work = Path(a.workdir or tempfile.mkdtemp())
    t0 = time.perf_counter()
    src = build(a.shape, a.layers, work / a.shape, default_tokenizer_dir())
    build_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    cfg = GPTQConfig(model=str(src), output=str(work / f"{a.shape}-gptq"), bits=a.bits, device="cuda",
                      true_sequential=not a.no_true_sequential,
                      calib=CalibConfig(nsamples=a.nsamples, seqlen=a.seqlen), validate=False, force=True,
                      # the shipped text is repeated (reshuffled) when nsamples x seqlen exceeds it; see calib.sampling
                      )
    out, report = quantize_model(cfg)
    s = report.extra["quantize"]
    full_depth = SHAPES[a.shape][6]
    per = s["layers"]
    res = {
        "shape": a.shape, "layers_built": a.layers, "full_depth": full_depth, "nsamples": a.nsamples, "seqlen": a.seqlen,
        "bits": a.bits, "true_sequential": not a.no_true_sequential, "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "transformers": transformers.__version__, "build_seconds": round(build_s, 1), "total_seconds": s["seconds"],
        "seconds_per_layer": [p["seconds"] for p in per],
        "peak_gpu_gib_per_layer": [round(p["peak_gpu_bytes"] / 2**30, 2) for p in per],
        "peak_gpu_gib": round(s["peak_gpu_bytes"] / 2**30, 2),
        "mean_rel_error_per_layer": [p["mean_rel_error"] for p in per],
        "extrapolated_full_model_minutes": round(sum(p["seconds"] for p in per[1:]) / max(len(per) - 1, 1) * full_depth / 60, 1),
    }
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
