"""bench/onnx_cuda.py runs end to end on the CPU EP (the H200 run uses the same code with --providers cuda,cpu)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("onnx_cuda_bench", ROOT / "bench" / "onnx_cuda.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_cpu_run_and_cuda_fallback(tmp_path, capsys, tied_model):
    import onnxruntime as ort

    bench = _bench()
    out = tmp_path / "r.json"
    assert bench.main(["--providers", "cuda,cpu", "--variants", "int4-gptq", "--prompt", "32", "--decode", "4",
                       "--workdir", str(tmp_path / "w"), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    err = capsys.readouterr().err
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "CUDAExecutionProvider is not available" in err
    rows = {(r["variant"], r["provider"]): r for r in res["rows"]}
    q = rows[("onnx-int4-gptq", "CPUExecutionProvider")]
    assert q["kl"] < 1e-6 and q["top1"] >= 0.99  # the checkpoint's own codes: same model as its torch dequant
    assert q["kl_vs_fp32"] > q["kl"] and q["decode_tok_s"] > 0 and q["prefill_tok_s"] > 0


def test_ep_verdict_uses_the_llamacpp_rule():
    """The CUDA EP row passes within 3x the CPU row's KL from exact math and fails beyond (or on NaN)."""
    bench = _bench()
    cpu = {"variant": "onnx-fp16", "kl": 2e-4, "top1": 0.99}
    ok = bench.ep_verdict({"variant": "onnx-fp16", "kl": 5e-4, "top1": 0.985}, cpu, (1e-4, 0.995))
    assert ok["ok"] and ok["cuda_vs_cpu_kl"] == 1e-4
    far = bench.ep_verdict({"variant": "onnx-fp16", "kl": 5e-2, "top1": 0.90}, cpu, (5e-2, 0.9))
    assert not far["ok"] and len(far["failures"]) == 2
    nan = bench.ep_verdict({"variant": "onnx-fp16", "kl": float("nan"), "top1": 0.0}, cpu, (float("nan"), 0.0))
    assert not nan["ok"] and "non-finite" in nan["failures"][0]
