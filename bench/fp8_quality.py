"""FP8 block, FP8 per-channel and GPTQ int8 side by side on the hard fixture (planted outlier channels), CPU.

Every row is scored against the same fp32 reference on the same held-out tokens; the FP8 rows through
the W8A8 reference (activations rounded to e4m3 as the serving kernel does). The "fault" row is FP8
block with every scale of one decoder layer multiplied by 1.1, the twin the quality test must fail.

    python bench/fp8_quality.py [--fixture qwen2-tiny-tied-outliers] [--max-tokens 2048] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def scale_fault(src: Path, dst: Path, layer: int = 1, factor: float = 1.1) -> Path:
    """A copy of an FP8 checkpoint with every weight scale of decoder layer ``layer`` times ``factor``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        sd = load_file(str(f))
        for k in sd:
            if f".layers.{layer}." in k and k.endswith(("weight_scale_inv", "weight_scale")):
                sd[k] = sd[k] * factor
        save_file(sd, str(f), metadata={"format": "pt"})
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", default="qwen2-tiny-tied-outliers")
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    import numpy as np

    from qwen_quant.backends import open_backend
    from qwen_quant.calib import CalibConfig, eval_tokens
    from qwen_quant.models import load_tokenizer
    from qwen_quant.progress import set_quiet
    from qwen_quant.quantize import GPTQConfig, quantize_model
    from qwen_quant.quantize.fp8 import FP8Config, quantize_fp8
    from qwen_quant.fixtures import fixture_path
    from qwen_quant.validate import EvalConfig, evaluate

    set_quiet(True)
    src = fixture_path(a.fixture)
    ev = EvalConfig(ctx=a.ctx, max_tokens=a.max_tokens, greedy_tokens=0)
    tokens = np.asarray(eval_tokens(load_tokenizer(src), max_tokens=ev.max_tokens), dtype=np.int64)
    tmp = Path(tempfile.mkdtemp())
    arts = {}
    quantize_fp8(FP8Config(model=str(src), output=str(tmp / "block"), device="cpu", validate=False))
    arts["FP8 block 128x128 (W8A8, fp8 layout)"] = tmp / "block"
    quantize_fp8(FP8Config(model=str(src), output=str(tmp / "chan"), format="compressed-tensors", scheme="dynamic",
                           device="cpu", validate=False))
    arts["FP8 per-channel, per-token act. (FP8_DYNAMIC)"] = tmp / "chan"
    quantize_model(GPTQConfig(model=str(src), output=str(tmp / "gptq8"), bits=8, group_size=128, sym=True,
                               calib=CalibConfig("shipped", 16, 256, 0), device="cpu", validate=False))
    arts["GPTQ int8 g128 sym (weight-only)"] = tmp / "gptq8"
    arts["fault: FP8 block, layer 1 scales x1.1"] = scale_fault(tmp / "block", tmp / "fault")
    rows = []
    with open_backend(src, device="cpu", dtype="float32") as ref:
        for name, path in arts.items():
            with open_backend(path, device="cpu") as b:
                m = evaluate(b, tokens, ev, ref)
            rows.append({"artifact": name, "perplexity": m["perplexity"], "ref_perplexity": m["ref_perplexity"],
                         "ppl_ratio": m["ppl_ratio"], "kl_mean": m["kl_mean"], "kl_p99": m["kl_p99"],
                         "top1": m["top1_agreement"]})
            print(f"| {name} | {m['perplexity']:.4f} | {m['ppl_ratio'] - 1:+.2%} | {m['kl_mean']:.2e} | "
                  f"{m['kl_p99']:.2e} | {m['top1_agreement']:.2%} |", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        a.json.write_text(json.dumps({"fixture": a.fixture, "tokens": int(len(tokens)), "ctx": a.ctx, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
