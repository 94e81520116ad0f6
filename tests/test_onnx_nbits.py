"""`export onnx` from a GPTQ / AWQ / compressed-tensors checkpoint (qwen_quant/export/onnx_nbits.py).

Real checkpoints written by our quantizers on the untied MHA fixture (hidden 128, intermediate 384, group
64), exported to ONNX and run on onnxruntime's CPU EP. Bars: the codes, scales and zero points inside each
MatMulNBits equal the checkpoint's (exactly; scales to their stored precision), every quantized linear is
replaced, and the ONNX logits match the dequantized torch model with max |diff| < 1e-3 and argmax >= 99%.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from qwen_quant.errors import QuantError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

GROUP = 64
CASES = {  # name -> (method, options); "gptq-actorder" also gets a permuted g_idx (see _act_order)
    "gptq-sym": ("gptq", dict(sym=True, desc_act=False)),
    "gptq-actorder": ("gptq", dict(sym=False, desc_act=True)),
    "awq": ("awq", dict(sym=False)),
    "ct": ("gptq", dict(sym=False, format="compressed-tensors")),
}
FAST = ("gptq-actorder", "ct")  # the others run with -m slow: same code path, other unpackers


def _quantize(model, out, method, bits=4, **kw):
    from qwen_quant.calib import CalibConfig
    from qwen_quant.progress import set_quiet
    from qwen_quant.quantize import config_for, quantize_model

    set_quiet(True)
    cfg = config_for(method, model=str(model), output=str(out), device="cpu", force=True, validate=False, bits=bits,
                     group_size=GROUP, calib=CalibConfig(nsamples=4, seqlen=128), **kw)
    return quantize_model(cfg)[0]


def _act_order(ckpt):
    """Reassign input channels to groups out of order (each group keeps GROUP members), as act-order GPTQ
    checkpoints from other toolkits (no static groups) store them; the checkpoint stays self-consistent."""
    from safetensors.torch import load_file, save_file

    f = ckpt / "model.safetensors"
    sd = load_file(str(f))
    rng = np.random.default_rng(0)
    perms = {}  # linears that read one input share one order, as GPTQ's act-order (one Hessian) gives them
    for k in sorted(k for k in sd if k.endswith(".g_idx")):
        shared = k.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
        perm = perms.setdefault(shared, rng.permutation(sd[k].numel()))
        sd[k] = sd[k][perm].contiguous()
    save_file(sd, str(f), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def ckpts(untied_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("nbits")
    made = {}

    def get(name):
        if name not in made:
            method, kw = CASES[name]
            made[name] = _quantize(untied_model, root / name, method, **kw)
            if name == "gptq-actorder":
                _act_order(made[name])
        return made[name]

    return get


def _export(model, out, **kw):
    from qwen_quant.export.onnx import OnnxExportConfig, export_onnx

    kw.setdefault("validate", False)
    return export_onnx(OnnxExportConfig(model=str(model), output=str(out), **kw))


def _ids():
    from tests.test_onnx import _eval_ids

    return _eval_ids(2, 48)


def _case(name):
    return pytest.param(name, marks=() if name in FAST else pytest.mark.slow)


@pytest.mark.parametrize("name", [_case(n) for n in CASES])
def test_checkpoint_codes_in_onnx(ckpts, name, tmp_path):
    import onnx

    from qwen_quant.backends.onnxrt import OrtBackend
    from qwen_quant.backends.torch_backend import TorchBackend
    from qwen_quant.export import onnx_nbits

    ckpt = ckpts(name)
    out = _export(ckpt, tmp_path / "onnx")
    proto = onnx.load(str(out / "model.onnx"))
    codes = onnx_nbits.read_codes(ckpt, json.loads((ckpt / "config.json").read_text()))
    assert len(codes) == 2 * 7  # 2 layers x q, k, v, o, gate, up, down
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulNBits") == len(codes)
    meta = json.loads((out / "qwen_quant_export.json").read_text())["checkpoint_codes"]
    assert meta["matmulnbits"] == meta["quantized_linears"] == len(codes) and meta["codes"] == "checkpoint"
    for lin, lc in codes.items():
        q, z, s, perm = onnx_nbits.read_back(proto, lin)
        if name == "gptq-actorder":
            assert lc.g_idx is not None and perm is not None
            assert np.array_equal(lc.g_idx[perm], np.arange(len(perm)) // GROUP)
            inv = np.argsort(perm)
            q = q[:, inv]  # back to the checkpoint's column order
        else:
            assert perm is None
        assert np.array_equal(q, lc.codes), lin
        assert np.array_equal(z, lc.zeros), lin
        np.testing.assert_array_equal(s, lc.scales.astype(np.float32))
    if name == "gptq-actorder":  # per layer one Gather each for q/k/v, o, gate/up, down
        assert sum(n.name.endswith("_act_order") for n in proto.graph.node) == 2 * 4

    ids = _ids()
    a = OrtBackend(out, device="cpu").logits(ids)
    b = TorchBackend(ckpt, device="cpu", dtype="float32").logits(ids)
    assert np.abs(a - b).max() < 1e-3
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.99


def _kl(p_logits, q_logits):
    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def test_closer_to_gptq_than_rtn(ckpts, untied_model, tmp_path):
    """The point of exporting the checkpoint's codes: the ONNX model is the GPTQ model, while re-quantizing
    the full-precision source with RTN (export onnx --int4) gives another model."""
    from qwen_quant.backends.onnxrt import OrtBackend
    from qwen_quant.backends.torch_backend import TorchBackend

    ckpt = ckpts("gptq-actorder")
    ids = _ids()
    ref = TorchBackend(ckpt, device="cpu", dtype="float32").logits(ids)
    ours = OrtBackend(_export(ckpt, tmp_path / "ours"), device="cpu").logits(ids)
    rtn = OrtBackend(_export(untied_model, tmp_path / "rtn", int4=True, block_size=GROUP, symmetric=False,
                             int4_embeddings=False), device="cpu").logits(ids)
    kl_ours, kl_rtn = _kl(ref, ours), _kl(ref, rtn)
    assert kl_ours < 1e-6 < kl_rtn and kl_ours * 100 < kl_rtn, (kl_ours, kl_rtn)


def test_reference_is_the_recorded_source(ckpts, untied_model):
    from qwen_quant.export.onnx import OnnxExportConfig, _reference

    ckpt = ckpts("ct")
    assert json.loads((ckpt / "qwen-quant-quantize.json").read_text())["source"] == str(untied_model)
    ref, why = _reference(ckpt, OnnxExportConfig(model=str(ckpt)), True)
    assert ref == untied_model and "qwen-quant-quantize.json" in why


def test_int8_gptq_is_refused(untied_model, tmp_path, run_cli):
    ckpt = _quantize(untied_model, tmp_path / "g8", "gptq", bits=8)
    code, out, err = run_cli("export", "onnx", ckpt, "-o", tmp_path / "x", "--no-validate")
    assert code == 2 and "8-bit" in err and "--int8" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_damaged_and_misused(ckpts, tmp_path, run_cli):
    from safetensors.torch import load_file, save_file

    src = ckpts("ct")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    sd = load_file(str(bad / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight_scale"]
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = run_cli("export", "onnx", bad, "-o", tmp_path / "x", "--no-validate")
    assert code == 2 and "damaged" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("export", "onnx", src, "-o", tmp_path / "x", "--int4", "--no-validate")
    assert code == 2 and "already quantized" in err
    assert not (tmp_path / "x").exists()


def test_group_size_matmulnbits_cannot_hold():
    from qwen_quant.export.onnx_nbits import LinearCodes, check_codes

    lc = LinearCodes(np.zeros((4, 96), np.int32), np.zeros((4, 2), np.int32), np.ones((4, 2), np.float32), None, 48)
    with pytest.raises(QuantError, match="group size 48"):
        check_codes({"x": lc})
