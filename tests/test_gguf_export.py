"""`export_gguf` (qwen_quant/export/gguf_export.py) and the `qwen-quant export gguf` command."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("llama_cpp")

from gguf_helpers import f16_gguf, model_dir  # noqa: E402

import qwen_quant.export.gguf_export as ge  # noqa: E402
from qwen_quant.errors import QuantError  # noqa: E402

NAME = "qwen2-tiny-tied"


@pytest.fixture
def fast_writer(monkeypatch):
    """Copy the cached F16 GGUF instead of re-writing the vocabulary (the writer has its own tests)."""
    def fake(src, out, outtype="f16"):
        assert outtype == "f16"
        shutil.copy(f16_gguf(NAME), out)
        return out
    monkeypatch.setattr(ge, "write_float_gguf", fake)


def test_export_several_types_from_one_intermediate(tmp_path, fast_writer):
    seen = []
    cfg = ge.GGUFExportConfig(model=str(model_dir(NAME)), types="q8_0,q4_k_m", outdir=str(tmp_path))
    paths = ge.export_gguf(cfg, validator=lambda p, t: seen.append((p.name, t)))
    stem = model_dir(NAME).name
    assert [p.name for p in paths] == [f"{stem}-q8_0.gguf", f"{stem}-q4_k_m.gguf"]
    assert seen == [(p.name, t) for p, t in zip(paths, ["q8_0", "q4_k_m"])]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)  # intermediate gone

    with pytest.raises(QuantError, match="--force"):
        ge.export_gguf(cfg, validator=lambda p, t: None)


def test_export_keeps_requested_float(tmp_path, fast_writer):
    cfg = ge.GGUFExportConfig(model=str(model_dir(NAME)), types="f16,q4_0", outdir=str(tmp_path), validate=False)
    paths = ge.export_gguf(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)


def test_unknown_type_lists_supported(tmp_path):
    cfg = ge.GGUFExportConfig(model=str(model_dir(NAME)), types="q4_k_m,q7_k", outdir=str(tmp_path))
    with pytest.raises(QuantError, match="q4_k_m.*q2_k"):
        ge.export_gguf(cfg)
    with pytest.raises(QuantError, match="outtype"):
        ge.export_gguf(ge.GGUFExportConfig(model=str(model_dir(NAME)), outtype="q8_0", outdir=str(tmp_path)))
    assert not any(tmp_path.iterdir())


def test_failure_never_leaves_final_name(tmp_path, fast_writer, monkeypatch):
    """A quantizer dying mid-write (disk full) leaves neither the final file nor temp files."""
    import qwen_quant.export.gguf_quant as gq

    def dying(inp, out, params):
        out = out.decode()
        with open(out, "wb") as f:
            f.write(b"GGUF partial")
        raise OSError(28, "No space left on device")

    import llama_cpp

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", dying)
    cfg = ge.GGUFExportConfig(model=str(model_dir(NAME)), types="q4_0", outdir=str(tmp_path), validate=False)
    with pytest.raises(OSError):
        ge.export_gguf(cfg)
    assert not list(tmp_path.iterdir())
    assert gq  # module imported: the patched symbol is the one it calls


def test_cli_export_gguf(tmp_path, fast_writer):
    from typer.testing import CliRunner

    from cli import app

    res = CliRunner().invoke(app, ["export", "gguf", str(model_dir(NAME)), "--type", "q8_0", "-o", str(tmp_path),
                                   "--no-validate", "--quiet"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / f"{model_dir(NAME).name}-q8_0.gguf").is_file()
    res = CliRunner().invoke(app, ["export", "gguf", str(model_dir(NAME)), "--type", "q9", "-o", str(tmp_path)])
    assert isinstance(res.exception, QuantError) and "q4_k_m" in str(res.exception)  # main() maps it to exit 2


def test_export_with_imatrix_differs_from_plain(tmp_path, fast_writer):
    """--imatrix: calibration samples -> torch hooks -> llama.cpp quantizer (the bytes change)."""
    base = dict(model=str(model_dir(NAME)), types="q4_k_m", validate=False, nsamples=4, seqlen=64)
    plain = ge.export_gguf(ge.GGUFExportConfig(outdir=str(tmp_path / "plain"), **base))[0]
    weighted = ge.export_gguf(ge.GGUFExportConfig(outdir=str(tmp_path / "imat"), imatrix=True, **base))[0]
    assert plain.read_bytes() != weighted.read_bytes()


@pytest.mark.slow
def test_export_validates_with_run_eval(tmp_path):
    """Default validation: lead's run_eval (perplexity, KL, top-1, greedy parity) writes a JSON report."""
    import json

    cfg = ge.GGUFExportConfig(model=str(model_dir(NAME)), types="q8_0", outdir=str(tmp_path),
                              json=str(tmp_path / "report.json"), eval_ctx=128, eval_max_tokens=1024)
    ge.export_gguf(cfg)
    (res,) = json.loads((tmp_path / "report.json").read_text())["results"]
    assert res["backend"]["name"] == "llama.cpp" and res["backend"]["dtype"] == "q8_0"
    assert res["metrics"]["kl_mean"] < 1e-3 and res["metrics"]["top1_agreement"] > 0.95
