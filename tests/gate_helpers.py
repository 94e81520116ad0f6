"""Artifacts of every type, built once per test session, and `eval`/`check` runs on them (test_faults, test_metadata).

All artifacts come from the untied fixture (hidden 128, MHA, untied lm_head: the smallest, and the
one with an lm_head to lose). Built once per process (functools.cache), because a session fixture
imported into two test modules would be built twice.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

# small and fast: 512 tokens in windows of 64, no greedy decoding (metrics and metadata only)
EVAL_ARGS = ("--ctx", "64", "--max-tokens", "512", "--greedy-tokens", "0", "-q")
TYPES = ("gptq", "awq", "ct", "gguf", "onnx")


@functools.cache
def workdir() -> Path:
    """A fresh temporary folder; QWEN_QUANT_GATE_DIR keeps one (and its clean artifacts) between runs."""
    keep = os.environ.get("QWEN_QUANT_GATE_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        return Path(keep)
    d = Path(tempfile.mkdtemp(prefix="qq-gate-"))
    atexit.register(shutil.rmtree, d, True)
    return d


@functools.cache
def reference() -> Path:
    from qwen_quant.progress import set_quiet
    from qwen_quant.fixtures import fixture_path

    set_quiet(True)
    return fixture_path("qwen2-tiny-untied")


@functools.cache
def artifact(kind: str) -> Path:
    """A clean artifact of ``kind`` (gptq, awq, ct, gguf, onnx) made from the untied fixture."""
    ref, root = reference(), workdir() / "clean"
    done = root / f"{kind}.path"
    if done.exists() and Path(done.read_text()).exists():
        return Path(done.read_text())
    path = _build(kind, ref, root)
    root.mkdir(parents=True, exist_ok=True)
    done.write_text(str(path))
    return path


def _build(kind: str, ref: Path, root: Path) -> Path:
    from qwen_quant.calib import CalibConfig
    from qwen_quant.quantize.config import config_for

    calib = CalibConfig(nsamples=8, seqlen=64)
    if kind in ("gptq", "awq", "ct"):
        kw = {"gptq": {}, "ct": {"format": "compressed-tensors"}, "awq": {}}[kind]
        cfg = config_for("awq" if kind == "awq" else "gptq", model=str(ref), output=str(root / f"tiny-{kind}"), bits=4, group_size=64, calib=calib,
                          device="cpu", validate=False, **kw)
        from qwen_quant.quantize import quantize_model as quantize
        out, _ = quantize(cfg)
        return Path(out)
    if kind == "gguf":
        from qwen_quant.export.gguf_export import GGUFExportConfig, export_gguf

        return Path(export_gguf(GGUFExportConfig(model=str(ref), types=["q8_0"], outdir=str(root / "gguf"), validate=False))[0])
    from qwen_quant.export.onnx import OnnxExportConfig, export_onnx

    return Path(export_onnx(OnnxExportConfig(model=str(ref), output=str(root / "tiny-onnx"), int4=True, validate=False)))


def eval_json(run_cli, path: Path, out: Path, *extra: str) -> tuple[int, str, dict | None]:
    """`qwen-quant eval PATH -r REF --json OUT`; (exit code, stderr, report or None)."""
    code, _, err = run_cli("eval", path, "-r", reference(), *EVAL_ARGS, "--json", out, *extra)
    return code, err, json.loads(out.read_text()) if code == 0 else None


@functools.cache
def clean_report(kind: str, run: int = 0) -> Path:
    """A clean eval report of ``kind`` (run 0 is the baseline every fault of that type is checked against)."""
    from qwen_quant.report import Report
    from qwen_quant.validate import EvalConfig, run_eval

    out = workdir() / f"clean-{kind}-{run}.json"
    r = run_eval(str(artifact(kind)), EvalConfig(ctx=64, max_tokens=512, greedy_tokens=0), reference=str(reference()))
    Report([r]).write_json(out)
    return out
