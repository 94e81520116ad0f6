"""The format table: each config our writers (and the peers' layouts) produce is detected as its format,
each entry dequantizes what its packer wrote, and layouts we do not read are refused in one line."""

from __future__ import annotations

import pytest
import torch

from qwen_quant.errors import QuantError
from qwen_quant.formats import awq, ct, fp8, gptq
from qwen_quant.formats.table import AWQ, CT_INT, FP8, GPTQ, by_name, detect
from qwen_quant.quantize.grid import Grid, rtn_quantize


def _configs():
    return {
        "gptq": (gptq.quantization_config(4, 128, True, True, 0.01), GPTQ, (4, 128), "4bit"),
        "gptq8": (gptq.quantization_config(8, -1, False, True, 0.01), GPTQ, (8, -1), "8bit"),
        "awq": (awq.quantization_config(4, 64), AWQ, (4, 64), "4bit"),
        "ct-w4": (ct.quantization_config(4, 32, False, ["lm_head"]), CT_INT, (4, 32), "4bit"),
        "ct-w8": (ct.quantization_config(8, -1, True, ["lm_head"]), CT_INT, (8, -1), "8bit"),
        "fp8-qwen": (fp8.fp8_config(["lm_head"]), FP8, (8, 128), "fp8"),
        "fp8-ct-block": (fp8.ct_config("block", ["lm_head"]), FP8, (8, 128), "fp8"),
        "fp8-ct-dynamic": (fp8.ct_config("dynamic", ["lm_head"]), FP8, (8, -1), "fp8"),
    }


@pytest.mark.parametrize("case", list(_configs()))
def test_our_writers_configs_are_detected(case):
    qc, fmt, bits, cls = _configs()[case]
    for config in ({"quantization_config": qc}, qc, {"text_config": {"quantization_config": qc}}):
        assert detect(config) is fmt
    assert fmt.bits_group(qc) == bits and fmt.artifact_class(qc) == cls
    assert by_name(fmt.name) is fmt


def test_full_precision_is_none():
    assert detect({"model_type": "qwen2"}) is None and detect({}) is None and detect(None) is None


@pytest.mark.parametrize("qc, words", [
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "gptq_v2"}, "checkpoint_format 'gptq_v2'"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "AWQ version 'gemv'"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method 'bitsandbytes'"),
    ({"quant_method": "compressed-tensors", "format": "marlin-24",
      "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}}}}, "format 'marlin-24'"),
])
def test_layouts_we_do_not_read_are_refused_in_one_line(qc, words):
    with pytest.raises(QuantError) as e:
        detect({"quantization_config": qc}, where="m/config.json")
    msg = str(e.value)
    assert words in msg and msg.startswith("m/config.json: ") and "\n" not in msg


@pytest.mark.parametrize("fmt, packer, grid", [
    (GPTQ, gptq.pack, Grid(4, 32, False)), (GPTQ, gptq.pack, Grid(8, -1, True)), (AWQ, awq.pack, Grid(4, 32, False)),
    (CT_INT, lambda n, r, b: ct.pack(n, r, b, torch.float32), Grid(4, 32, True)),
])
def test_each_entry_dequantizes_what_its_packer_wrote(fmt, packer, grid):
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    r = rtn_quantize(w, grid)
    qc = {GPTQ: lambda: gptq.quantization_config(grid.bits, grid.group_size, False, grid.sym, 0.01),
          AWQ: lambda: awq.quantization_config(grid.bits, grid.group_size),
          CT_INT: lambda: ct.quantization_config(grid.bits, grid.group_size, grid.sym, [])}[fmt]()
    tensors = packer("model.layers.0.mlp.up_proj", r, None)
    assert fmt.is_packed(tensors, "model.layers.0.mlp.up_proj") and not fmt.is_packed(tensors, "model.layers.0.mlp.down_proj")
    got = fmt.dequantize(tensors, "model.layers.0.mlp.up_proj", qc)
    g = r.g_idx.long()
    want = r.scales.half().float()[:, g] * (r.codes - r.zeros[:, g]).float()  # scales are stored as float16
    tol = 1e-6 if fmt is not CT_INT else 1e-3 * float(want.abs().max())  # the library re-derives codes from float
    assert got.shape == (64, 128) and float((got - want).abs().max()) <= tol


def test_fp8_has_no_packed_linears():
    with pytest.raises(QuantError, match="not packed linears"):
        FP8.dequantize({}, "x", fp8.fp8_config([]))
