"""Mixture-of-Experts quantization (qwen_quant/quantize/moe.py, gptq_batched.py): fast checks."""

from __future__ import annotations

import pytest
import torch

from qwen_quant.quantize.gptq import gptq_quantize
from qwen_quant.quantize.gptq_batched import gptq_quantize_batched
from qwen_quant.quantize.grid import Grid


@pytest.mark.parametrize("grid", [Grid(4, 128, True), Grid(4, 64, False), Grid(4, -1, True)])
def test_batched_solve_equals_per_expert_solve(grid):
    """The batched experts' solve gives the per-expert loop's codes (measured: identical, 100%)."""
    torch.manual_seed(0)
    E, R, C = 4, 64, 256
    W = torch.randn(E, R, C)
    X = torch.randn(E, 300, C)
    H = torch.einsum("etk,etl->ekl", X, X) * 2 / 300
    batched = gptq_quantize_batched(W, H.clone(), grid)
    loop = [gptq_quantize(W[e], H[e].clone(), grid) for e in range(E)]
    for a, b in zip(batched, loop):
        assert torch.equal(a.codes, b.codes)
        assert torch.allclose(a.scales, b.scales)
        assert abs(a.error - b.error) < 1e-6
