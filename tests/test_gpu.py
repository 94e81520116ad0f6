"""CUDA paths (run on the GPU machine; skipped elsewhere): GPTQ on the GPU and validation on the torch CUDA backend."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_gptq_on_cuda_validates(untied_model, tmp_path):
    from qwen_quant.calib import CalibConfig
    from qwen_quant.quantize import GPTQConfig, quantize_model
    from qwen_quant.validate import EvalConfig

    out, report = quantize_model(GPTQConfig(
        model=str(untied_model), output=str(tmp_path / "q"), device="cuda", calib=CalibConfig(nsamples=64, seqlen=256),
        eval=EvalConfig(ctx=256, max_tokens=4096, greedy_tokens=16)))
    r = report.results[0]
    assert r.backend["device"].startswith("cuda")
    assert report.extra["quantize"]["peak_gpu_bytes"] > 0
    assert r.metrics["top1_agreement"] > 0.9 and r.metrics["ppl_ratio"] < 1.03, r.metrics
    print("\nGPTQ int4 on CUDA:", {k: r.metrics[k] for k in ("perplexity", "ppl_ratio", "kl_mean", "top1_agreement", "greedy_exact")})


def test_torch_backend_cuda_matches_cpu(untied_model):
    import numpy as np

    from qwen_quant.backends import open_backend

    ids = np.random.default_rng(0).integers(0, 5000, (2, 64))
    with open_backend(untied_model, device="cpu") as cpu, open_backend(untied_model, device="cuda", dtype="fp32") as gpu:
        a, b = cpu.logits(ids), gpu.logits(ids)
        assert np.abs(a - b).max() < 1e-3
        assert cpu.greedy(ids[0, :16].tolist(), 16) == gpu.greedy(ids[0, :16].tolist(), 16)


def test_awq_on_cuda_validates(untied_model, tmp_path):
    from qwen_quant.calib import CalibConfig
    from qwen_quant.quantize import AWQConfig, quantize_model
    from qwen_quant.validate import EvalConfig

    out, report = quantize_model(AWQConfig(
        model=str(untied_model), output=str(tmp_path / "a"), format="awq", sym=False, device="cuda",
        calib=CalibConfig(nsamples=64, seqlen=256), eval=EvalConfig(ctx=256, max_tokens=4096, greedy_tokens=16)))
    r = report.results[0]
    assert report.extra["quantize"]["peak_gpu_bytes"] > 0
    assert r.metrics["top1_agreement"] > 0.9 and r.metrics["ppl_ratio"] < 1.03, r.metrics
    print("\nAWQ int4 on CUDA:", {k: r.metrics[k] for k in ("perplexity", "ppl_ratio", "kl_mean", "top1_agreement", "greedy_exact")})
