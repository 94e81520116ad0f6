"""The quantizer interface: the config's type picks the algorithm, so a config of one method can
never produce another method's result (each method leaves its own fingerprint in the checkpoint)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from qwen_quant.calib import CalibConfig
from qwen_quant.errors import QuantError
from qwen_quant.quantize import AWQConfig, GPTQConfig, QuantConfig, RTNConfig, config_for, quantize_model
from qwen_quant.quantize.awq import AWQQuantizer, awq_rtn
from qwen_quant.quantize.grid import Grid, rtn_quantize
from qwen_quant.quantize.run import GPTQQuantizer, RTNQuantizer, quantizer_for

CALIB = CalibConfig(nsamples=4, seqlen=64)
LIN = "model.layers.0.self_attn.q_proj"


def test_dispatch_on_config_type():
    grid = Grid(4, 128, True)
    for cfg, cls in ((GPTQConfig(), GPTQQuantizer), (RTNConfig(), RTNQuantizer), (AWQConfig(), AWQQuantizer)):
        assert type(quantizer_for(cfg, grid)) is cls
        assert type(config_for(cfg.method)) is type(cfg)
    with pytest.raises(QuantError, match="choose a method"):
        QuantConfig(model="m", output="o").check()
    with pytest.raises(TypeError):  # method-specific fields belong to their method only
        RTNConfig(damp=0.1)
    with pytest.raises(TypeError):
        GPTQConfig(clip=False)


def _run(cfg_cls, model, out, **kw):
    seen: dict = {}
    cfg = cfg_cls(model=str(model), output=str(out), calib=CALIB, device="cpu", validate=False, force=True, **kw)
    path, report = quantize_model(cfg, on_layer=lambda p, r: seen.update({f"{p}.{k}": v for k, v in r.items()}))
    return path, report.extra["quantize"], seen


@pytest.fixture(scope="module")
def source(untied_model):
    return load_file(str(untied_model / "model.safetensors"))


def test_each_config_gives_its_own_method(untied_model, tmp_path, source):
    w = source[f"{LIN}.weight"].float()
    grid_sym, grid_asym = Grid(4, 128, True), Grid(4, 128, False)
    norm = "model.layers.0.input_layernorm.weight"

    # RTN: exactly round-to-nearest of the source weights, norms untouched
    p, s, rtn = _run(RTNConfig, untied_model, tmp_path / "rtn")
    assert s["method"] == "rtn"
    assert torch.equal(rtn[LIN].dequant(), rtn_quantize(w, grid_sym).dequant())
    assert torch.equal(load_file(str(p / "model.safetensors"))[norm], source[norm].half())

    # GPTQ: not round-to-nearest (the solve moves codes), lower output error, norms untouched
    p, s, gptq = _run(GPTQConfig, untied_model, tmp_path / "gptq")
    assert s["method"] == "gptq"
    assert not torch.equal(gptq[LIN].dequant(), rtn[LIN].dequant())
    assert gptq[LIN].error < rtn[LIN].error
    assert torch.equal(load_file(str(p / "model.safetensors"))[norm], source[norm].half())

    # AWQ: scales folded into the norm before q/k/v (the float model moves), codes are not plain RTN
    p, s, awq = _run(AWQConfig, untied_model, tmp_path / "awq", clip=False)
    assert s["method"] == "awq" and s["options"]["clip"] is False
    assert not torch.allclose(load_file(str(p / "model.safetensors"))[norm], source[norm].half())
    assert not torch.equal(awq[LIN].dequant(), awq_rtn(w, grid_asym).dequant())
