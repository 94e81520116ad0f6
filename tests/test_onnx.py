"""ONNX export (qwen_quant/export/onnx.py) and the onnxruntime backend (qwen_quant/backends/onnxrt.py).

One fp32 export of the tied fixture is shared by the module (export costs ~10-20 s on 2 cores).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from qwen_quant.errors import QuantError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

PROMPTS = [[151644, 872, 198, 3838, 374, 279, 6722, 315, 9625, 30, 151645, 198, 151644, 77091, 198],
           [785, 3974, 13876, 38835, 34208, 916, 279, 15678, 5562, 13]]


def _export(model, out, **kw):
    from qwen_quant.export.onnx import OnnxExportConfig, export_onnx

    kw.setdefault("validate", False)
    return export_onnx(OnnxExportConfig(model=str(model), output=str(out), **kw))


def _eval_ids(n=2, t=48):
    """Token ids from the shipped evaluation text, so the trained fixtures see text they model well."""
    from transformers import AutoTokenizer

    from qwen_quant.calib import eval_tokens
    from qwen_quant.fixtures import tokenizer_dir

    toks = np.asarray(eval_tokens(AutoTokenizer.from_pretrained(str(tokenizer_dir())), "shipped", max_tokens=n * t + 1))
    return toks[: n * t].astype(np.int64).reshape(n, t)


@pytest.fixture(scope="module")
def tied_onnx(tied_model, tmp_path_factory):
    return _export(tied_model, tmp_path_factory.mktemp("onnx") / "tied-fp32")


@pytest.fixture(scope="module")
def torch_ref(tied_model):
    from qwen_quant.backends.torch_backend import TorchBackend

    return TorchBackend(tied_model, device="cpu", dtype="float32")


def test_export_layout(tied_onnx, tied_model):
    import onnx

    names = sorted(p.name for p in tied_onnx.iterdir())
    for f in ("model.onnx", "genai_config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"):
        assert f in names
    assert not any(p.name.startswith(".") for p in tied_onnx.parent.iterdir()), "temp folder left behind"
    m = onnx.load(str(tied_onnx / "model.onnx"), load_external_data=False)
    n = json.loads((tied_model / "config.json").read_text())["num_hidden_layers"]
    ins = [i.name for i in m.graph.input]
    assert ins[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert ins[3:] == [f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    assert [o.name for o in m.graph.output] == ["logits"] + [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in list(m.graph.input) + list(m.graph.output)}
    assert dims["input_ids"] == ["batch", "sequence_length"]
    assert dims["attention_mask"] == ["batch", "total_sequence_length"]
    assert dims["past_key_values.0.key"][0::2] == ["batch", "past_sequence_length"]
    assert dims["present.0.key"][2] == "total_sequence_length"


def test_fp32_logits_match_torch(tied_onnx, torch_ref):
    from qwen_quant.backends.onnxrt import OrtBackend

    ids = _eval_ids()
    ob = OrtBackend(tied_onnx, device="cpu", chunk=1000)
    diff = float(np.abs(ob.logits(ids) - torch_ref.logits(ids)).max())
    print(f"fp32 onnx vs torch max abs logit diff: {diff:.2e}")
    assert diff < 1e-4
    assert ob.vocab_size == torch_ref.vocab_size and ob.dtype == "float32"


def test_cache_equals_recompute(tied_onnx):
    """Chunked scoring through the KV cache (chunk 7, 1) equals one pass without a cache."""
    from qwen_quant.backends.onnxrt import OrtBackend

    ids = _eval_ids(t=30)
    full = OrtBackend(tied_onnx, device="cpu", chunk=1000).logits(ids)
    for chunk in (7, 1):
        diff = float(np.abs(OrtBackend(tied_onnx, device="cpu", chunk=chunk).logits(ids) - full).max())
        assert diff < 1e-4, (chunk, diff)


def test_io_binding_logits_equal_plain_run(tied_onnx):
    """The IO-bound path (cache kept as OrtValues, logits out through DLPack) equals plain session.run."""
    import torch

    from qwen_quant.backends.onnxrt import OrtBackend

    ids = _eval_ids(t=30)
    ob = OrtBackend(tied_onnx, device="cpu", chunk=7)
    plain = ob.logits(ids)
    bound = ob.device_logits(ids)
    assert isinstance(bound, torch.Tensor) and bound.device.type == "cpu" and bound.shape == plain.shape
    assert float(np.abs(bound.float().numpy() - plain).max()) < 1e-5
    tail = ob.device_logits(ids, keep=11)  # starts inside a chunk
    assert tail.shape[1] == 11 and float(np.abs(tail.float().numpy() - plain[:, -11:]).max()) < 1e-5


def test_cuda_ep_refused_without_onnxruntime_gpu(tied_onnx):
    import onnxruntime as ort

    from qwen_quant.backends.onnxrt import OrtBackend
    from qwen_quant.errors import QuantError

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(QuantError, match="needs onnxruntime-gpu"):
        OrtBackend(tied_onnx, device="cuda")


def test_left_padding_matches_unpadded(tied_onnx):
    from qwen_quant.backends.onnxrt import OrtBackend

    ob = OrtBackend(tied_onnx, device="cpu", chunk=8)
    ids = _eval_ids(n=2, t=24)
    short = ids[1, :15]
    pad = 24 - len(short)
    batch = np.stack([ids[0], np.concatenate([np.full(pad, 151643), short])])
    mask = np.stack([np.ones(24, np.int64), np.r_[np.zeros(pad, np.int64), np.ones(len(short), np.int64)]])
    got = ob.logits(batch, attention_mask=mask)
    assert np.isfinite(got).all()
    assert float(np.abs(got[1, pad:] - ob.logits(short[None])[0]).max()) < 1e-4
    assert float(np.abs(got[0] - ob.logits(ids[:1])[0]).max()) < 1e-4


def test_greedy_equals_torch(tied_onnx, torch_ref):
    from qwen_quant.backends.onnxrt import OrtBackend

    ob = OrtBackend(tied_onnx, device="cpu", chunk=4)  # prompt prefill crosses chunk borders
    for p in PROMPTS:
        ours, ref = ob.greedy(p, 24), torch_ref.greedy(p, 24)
        assert ours == ref
    assert ob.greedy(PROMPTS[0], 0) == [] and len(ob.greedy(PROMPTS[0], 1)) == 1


def test_genai_generator_matches_backend(tied_onnx):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai not installed (pip install .[onnx])")
    from qwen_quant.backends.onnxrt import OrtBackend

    model = og.Model(str(tied_onnx))
    ob = OrtBackend(tied_onnx, device="cpu")
    for p in PROMPTS:
        n = 20
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(p) + n, min_length=len(p) + n)
        gen = og.Generator(model, params)
        gen.append_tokens(p)
        toks = []
        while not gen.is_done():
            gen.generate_next_token()
            toks.append(int(gen.get_next_tokens()[0]))
        assert toks == ob.greedy(p, n)


def test_refuses_existing_output(tied_model, tied_onnx):
    with pytest.raises(QuantError, match="--force"):
        _export(tied_model, tied_onnx)


def test_72b_shape_external_data_fp16(model_72b, tmp_path):
    """GQA 8:1 + odd intermediate; threshold 0 forces model.onnx.data (what >1 GiB models get); fp16."""
    import onnx

    from qwen_quant.backends.onnxrt import OrtBackend
    from qwen_quant.backends.torch_backend import TorchBackend

    out = _export(model_72b, tmp_path / "m72", fp16=True, external_data_threshold=0)
    assert (out / "model.onnx.data").stat().st_size > (out / "model.onnx").stat().st_size
    assert json.loads((out / "qwen_quant_export.json").read_text())["external_data"] is True
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)
    ob = OrtBackend(out, device="cpu")
    assert ob.dtype == "float16" and ob.vocab_size == 152064
    ids = _eval_ids(n=1, t=32)
    ref = TorchBackend(model_72b, device="cpu", dtype="float32")
    lg, rl = ob.logits(ids), ref.logits(ids)
    diff = float(np.abs(lg - rl).max())
    top1 = float((lg.argmax(-1) == rl.argmax(-1)).mean())
    print(f"72b-shape fp16 onnx vs torch fp32: max abs {diff:.3f}, top-1 agreement {top1:.3f}")
    assert top1 >= 0.95 and diff < 0.5
    assert ob.greedy(PROMPTS[0], 12) == ref.greedy(PROMPTS[0], 12)


def test_backend_rejects_non_onnx(tmp_path):
    import onnxruntime as ort

    from qwen_quant.backends.onnxrt import OrtBackend
    from qwen_quant.devices import ort_providers

    with pytest.raises(QuantError, match="export one"):
        OrtBackend(tmp_path, device="cpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(QuantError, match="onnxruntime-gpu"):
            ort_providers("cuda")

def test_cli_export(untied_model, tmp_path, run_cli):
    out = tmp_path / "cli-onnx"
    code, _, err = run_cli("export", "onnx", untied_model, "-o", out, "--no-validate", "-q")
    assert code == 0, err
    assert (out / "model.onnx").exists() and (out / "genai_config.json").exists()
    code, _, err = run_cli("export", "onnx", untied_model, "-o", out, "--no-validate")
    assert code == 2 and "--force" in err


def test_export_validates_with_report(untied_model, tmp_path):
    """Validation after export runs the lead's run_eval on onnxruntime against torch and writes the report."""
    report = tmp_path / "report.json"
    _export(untied_model, tmp_path / "v", int4=True, validate=True, json=str(report), eval_ctx=128, eval_max_tokens=512)
    r = json.loads(report.read_text())["results"][0]
    m = r["metrics"]
    print(f"validation of int4 export: ppl {m['perplexity']:.3f} vs ref {m['ref_perplexity']:.3f}, "
          f"KL {m['kl_mean']:.4f}, top-1 {m['top1_agreement']:.3f}, greedy exact {m.get('greedy_exact')}/{m.get('greedy_prompts')}")
    assert r["backend"]["name"] == "onnxruntime" and r["artifact"]["type"] == "onnx-int4"
    assert m["top1_agreement"] > 0.8 and m["ppl_ratio"] < 1.2
