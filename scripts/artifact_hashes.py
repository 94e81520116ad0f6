"""Hashes of the demo's artifacts built from the tiny fixture (GPTQ, AWQ, GGUF q8_0/q4_k_m, ONNX int4).

Used to show that a refactor leaves every artifact byte-identical: run it before and after and
compare, or let tests/test_byte_identity.py compare against the recorded values.
Usage: python scripts/artifact_hashes.py OUTDIR [--json FILE]
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

# Summaries carry timings and paths; everything else a build writes must be identical.
VOLATILE = {"qwen-quant-quantize.json", "qwen-quant-report.json", "qwen_quant_export.json"}


def tree_hashes(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.name not in VOLATILE)
    return {(p.name if path.is_file() else str(p.relative_to(path))): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


def build_all(outdir: Path, parts=("gptq", "awq", "gguf", "onnx")) -> dict[str, dict[str, str]]:
    from qwen_quant.calib import CalibConfig
    from qwen_quant.progress import set_quiet
    from qwen_quant.testing.fixtures import fixture_path

    set_quiet(True)
    model = fixture_path("qwen2-tiny-tied")
    calib = CalibConfig("shipped", 32, 256, 0)
    out: dict[str, dict[str, str]] = {}
    if "gptq" in parts:
        out["gptq"] = tree_hashes(_quant(model, outdir / "gptq", "gptq", "gptq", True, calib))
    if "awq" in parts:
        out["awq"] = tree_hashes(_quant(model, outdir / "awq", "awq", "awq", False, calib))
    if "gguf" in parts:
        from qwen_quant.export.gguf_export import GGUFExportConfig, export_gguf

        res = export_gguf(GGUFExportConfig(model=str(model), types=["q8_0", "q4_k_m"], outdir=str(outdir / "gguf"),
                                           force=True, validate=False))
        paths = getattr(res, "paths", res)
        # file names carry the fixture's cache key; name them by their type
        out["gguf"] = {Path(p).name.rsplit("-", 1)[-1]: v for p in paths for v in tree_hashes(Path(p)).values()}
    if "onnx" in parts:
        from qwen_quant.export.onnx import OnnxExportConfig, export_onnx

        res = export_onnx(OnnxExportConfig(model=str(model), output=str(outdir / "onnx"), int4=True, block_size=32,
                                           force=True, validate=False))
        out["onnx"] = tree_hashes(Path(getattr(res, "path", res)))
    return out


def _quant(model, out, method, fmt, sym, calib):
    from qwen_quant import quantize

    cls = {"gptq": quantize.GPTQConfig, "awq": quantize.AWQConfig}[method]
    res = quantize.quantize_model(cls(model=str(model), output=str(out), bits=4, group_size=128, sym=sym, format=fmt,
                                      calib=calib, device="cpu", force=True, validate=False))
    return Path(getattr(res, "path", None) or res[0])


if __name__ == "__main__":
    hashes = build_all(Path(sys.argv[1]))
    text = json.dumps(hashes, indent=2, sort_keys=True)
    if "--json" in sys.argv:
        Path(sys.argv[sys.argv.index("--json") + 1]).write_text(text + "\n")
    print(text)
