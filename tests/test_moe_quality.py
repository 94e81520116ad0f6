"""Quality orderings on the trained Mixture-of-Experts fixtures (qwen_quant/fixtures.py): GPTQ and AWQ
must beat round-to-nearest by the margins tests/test_quality.py asks of qwen2, and the disabled twins
(GPTQ with an identity Hessian, AWQ with its scales forced to 1) must miss them."""

from __future__ import annotations

import pytest
import torch

from test_quality import EVAL, RECOVERY, RTN_LOSS, _fixture, _measurer, _quantize, recovery

from qwen_quant.quantize import awq

FIXTURE = "qwen3-moe-tiny-outliers"


@pytest.fixture(scope="module")
def hard():
    return _fixture(FIXTURE)


@pytest.fixture(scope="module")
def measure(hard):
    run, close = _measurer(hard, EVAL)
    yield run
    close()


@pytest.fixture(scope="module")
def rtn(hard, measure, tmp_path_factory):
    return measure(_quantize(hard, tmp_path_factory.mktemp("rtn") / "q", "rtn"))


def _line(label, m, rtn):
    return (f"\n{FIXTURE} {label}: ppl ratio {m['ppl_ratio']:.4f}, KL {m['kl_mean']:.5f}, top-1 {m['top1_agreement']:.3f}"
            + ("" if m is rtn else f"; recovers {recovery(m, rtn):.0%} of RTN's ppl loss, {recovery(m, rtn, 'kl_mean'):.0%} of its KL"))


def test_rtn_int4_loses(rtn):
    print(_line("RTN int4 g128", rtn, rtn))
    assert rtn["ppl_ratio"] - 1 >= RTN_LOSS, rtn


def test_gptq_recovers_half_of_rtns_loss(hard, measure, rtn, tmp_path):
    m = measure(_quantize(hard, tmp_path / "gptq"))
    print(_line("GPTQ int4 g128", m, rtn))
    assert recovery(m, rtn) >= RECOVERY and recovery(m, rtn, "kl_mean") >= RECOVERY, (m, rtn)


@pytest.mark.slow
def test_gptq_condition_fails_when_disabled(hard, measure, rtn, tmp_path, monkeypatch):
    """An identity Hessian for every linear, the experts' batched solve included: round-to-nearest."""
    from qwen_quant.quantize import gptq_batched, run

    real, real_b = run.gptq_quantize, gptq_batched.gptq_quantize_batched
    monkeypatch.setattr(run, "gptq_quantize", lambda W, H, *a, **k: real(W, torch.eye(H.shape[0], dtype=H.dtype), *a, **k))
    monkeypatch.setattr(gptq_batched, "gptq_quantize_batched",
                        lambda W, H, *a, **k: real_b(W, torch.eye(H.shape[-1], dtype=H.dtype).expand_as(H).clone(), *a, **k))
    off = measure(_quantize(hard, tmp_path / "gptq-off"))
    print(_line("GPTQ, identity Hessian", off, rtn))
    assert recovery(off, rtn) < RECOVERY, (off, rtn)


def test_awq_recovers_half_of_rtns_loss(hard, measure, rtn, tmp_path):
    m = measure(_quantize(hard, tmp_path / "awq", "awq"))
    print(_line("AWQ int4 g128", m, rtn))
    assert recovery(m, rtn) >= RECOVERY and recovery(m, rtn, "kl_mean") >= RECOVERY, (m, rtn)


@pytest.mark.slow
def test_awq_condition_fails_when_disabled(hard, measure, rtn, tmp_path, monkeypatch):
    from qwen_quant.quantize.layerwise import get_module

    monkeypatch.setattr(awq, "search_scale",
                        lambda lw, layer, pair, *a, **k: torch.ones(get_module(layer, pair.linears[0]).in_features))
    off = measure(_quantize(hard, tmp_path / "awq-off", "awq"))
    print(_line("AWQ, scales forced to 1", off, rtn))
    assert recovery(off, rtn) < RECOVERY, (off, rtn)
