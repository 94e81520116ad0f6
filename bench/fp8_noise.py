"""What an FP8 artifact's metrics look like when nothing is wrong: the numbers `check`'s fp8 class defaults come from.

FP8 needs no calibration, so there is no seed to vary and the CPU evaluation is bit-repeatable
(docs/gate.md): the spread that matters is over models and over evaluation text. Each trained fixture
is quantized with both schemes (block 128x128 and per-channel) and scored through the W8A8 reference;
the held-out tokens are split into ``--splits`` disjoint parts and each part scored alone, so the
spread over parts is the text noise of one number. Prints JSON (and writes it with ``--out``).

    python bench/fp8_noise.py [--max-tokens 4096] [--splits 4] [--out bench/results/fp8-noise-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FIXTURES = ("qwen2-tiny-tied", "qwen2-tiny-untied", "qwen3-tiny", "qwen2-tiny-tied-outliers")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixtures", default=",".join(FIXTURES))
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--splits", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()

    import numpy as np

    from qwen_quant.backends import open_backend
    from qwen_quant.calib import eval_tokens
    from qwen_quant.models import load_tokenizer
    from qwen_quant.progress import set_quiet
    from qwen_quant.quantize.fp8 import FP8Config, quantize_fp8
    from qwen_quant.fixtures import fixture_path
    from qwen_quant.validate import EvalConfig, evaluate

    set_quiet(True)
    ev = EvalConfig(ctx=a.ctx, max_tokens=a.max_tokens, greedy_tokens=0)
    rows, tmp = [], Path(tempfile.mkdtemp())
    for fx in a.fixtures.split(","):
        src = fixture_path(fx)
        tokens = np.asarray(eval_tokens(load_tokenizer(src), max_tokens=a.max_tokens), dtype=np.int64)
        parts = np.array_split(tokens, a.splits)
        with open_backend(src, device="cpu", dtype="float32") as ref:
            for scheme, fmt in (("block", "fp8"), ("dynamic", "compressed-tensors")):
                out = tmp / f"{fx}-{scheme}"
                quantize_fp8(FP8Config(model=str(src), output=str(out), format=fmt, scheme=scheme, device="cpu",
                                       validate=False))
                with open_backend(out, device="cpu") as b:
                    split = [evaluate(b, p, ev, ref) for p in parts]
                row = {"fixture": fx, "scheme": scheme, "tokens": int(len(tokens)),
                       **{k: float(np.mean([m[k] for m in split])) for k in ("ppl_ratio", "kl_mean", "top1_agreement")},
                       "parts": [{k: m[k] for k in ("ppl_ratio", "kl_mean", "top1_agreement")} for m in split]}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "parts"}), flush=True)
    worst = {"max_ppl_ratio": max(p["ppl_ratio"] for r in rows for p in r["parts"]),
             "max_kl": max(p["kl_mean"] for r in rows for p in r["parts"]),
             "min_top1": min(p["top1_agreement"] for r in rows for p in r["parts"])}
    res = {"ctx": a.ctx, "splits": a.splits, "rows": rows, "worst_part": worst}
    print(json.dumps({"worst_part": worst}))
    if a.out:
        a.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
