"""One set of option names across commands, help that matches the code, and the one --device parser."""

import pytest
from typer.testing import CliRunner

from qwen_quant.devices import parse, torch_device, torch_devices, vllm_placement
from qwen_quant.errors import QuantError

from cli import app

runner = CliRunner()


def _help(*cmd: str) -> str:
    r = runner.invoke(app, [*cmd, "--help"], env={"COLUMNS": "400", "NO_COLOR": "1", "TERM": "dumb"})
    assert r.exit_code == 0, r.output
    return r.output


@pytest.mark.parametrize("cmd", [("gptq",), ("awq",), ("fp8",), ("run",), ("convert",), ("export", "gguf"), ("export", "onnx")])
def test_output_is_dash_o_everywhere(cmd):
    text = _help(*cmd)
    assert "--output" in text and "-o" in text
    assert "--outdir" not in text  # the old spelling is a hidden alias


def test_awq_sym_matches_recipes_and_old_spelling_is_hidden():
    text = _help("awq")
    assert "--sym" in text and "--asym" in text and "--zero-point" not in text


def test_eval_help_names_every_backend_and_dtype_rule():
    text = " ".join(_help("eval").split())
    for name in ("torch", "llama.cpp", "onnxruntime", "vllm"):
        assert name in text
    assert "ignore it" in text  # --dtype says what the runtimes without a dtype choice do


def test_outdir_alias_still_parses(tmp_path):
    r = runner.invoke(app, ["export", "gguf", str(tmp_path / "missing"), "--outdir", str(tmp_path / "o"), "--no-validate"])
    assert isinstance(r.exception, QuantError) and "does not exist" in str(r.exception)  # parsed; the model is refused


def test_device_spellings():
    assert parse(None) == parse("auto") == ("auto", [])
    assert parse("cpu") == ("cpu", []) and parse("cuda") == ("cuda", [])
    assert parse("cuda:1") == ("cuda", [1])
    assert parse("cuda:0,1") == parse("cuda:0,cuda:1") == parse("0,1") == ("cuda", [0, 1])
    for bad in ("gpu", "cuda:x", "cuda:", "mps", "1,b"):
        with pytest.raises(QuantError, match="is not a device"):
            parse(bad)


def test_device_per_runtime():
    import torch

    assert torch_devices("cpu") == ["cpu"] and torch_device("cpu") == "cpu"
    assert torch_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert vllm_placement("cuda:0,1") == ("cuda", 2, "0,1") and vllm_placement("cpu") == ("cpu", 1, None)
    assert vllm_placement("cuda") == ("cuda", 1, None)
    if not torch.cuda.is_available():
        with pytest.raises(QuantError, match="no CUDA device"):
            torch_devices("cuda:0,1")
