"""Recipe schema: shipped recipes parse into the CLI's dataclasses; bad recipes fail naming key and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwen_quant.calib import CalibConfig
from qwen_quant.errors import QuantError
from qwen_quant.export.gguf_export import GGUFExportConfig
from qwen_quant.export.onnx import OnnxExportConfig
from qwen_quant.quantize import GPTQConfig, QuantConfig
from qwen_quant.recipe import load_recipe, parse_recipe
from qwen_quant.recipe import state as st
from qwen_quant.validate import EvalConfig

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
SEEDS = {"qwen1.5-7b", "qwen1.5-4b-chat", "qwen1.5-72b-chat", "qwen-7b", "qwen2-1.5b", "demo"}

GOOD = """\
name: t
source:
  model: ./m
calibration: {nsamples: 16, seqlen: 128}
evaluation: {ctx: 128}
artifacts:
  - name: g4
    type: gptq
    bits: 4
"""


def test_every_seed_model_has_a_recipe():
    assert SEEDS <= {p.stem for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_validates(path):
    r = load_recipe(path)
    assert r.artifacts and isinstance(r.calib, CalibConfig) and isinstance(r.eval, EvalConfig)
    for a in r.artifacts:
        assert isinstance(a.config, (QuantConfig, GGUFExportConfig, OnnxExportConfig))
        assert a.backends


def test_options_fill_the_cli_dataclasses():
    r = parse_recipe(GOOD + """\
  - {name: a, type: awq, group_size: 64, calibration: {nsamples: 8}}
  - {name: gg, type: gguf, types: [q4_k_m, q8_0], imatrix: true}
  - {name: o, type: onnx, int4: true, block_size: 64, backends: [onnxruntime]}
thresholds: {max_ppl_increase: 2%, max_kl: 0.05}
""")
    g, a, gg, o = r.artifacts
    assert g.config == GPTQConfig(model="", output="", bits=4, calib=CalibConfig(nsamples=16, seqlen=128))
    assert (a.config.method, a.config.format, a.config.sym, a.config.group_size) == ("awq", "awq", False, 64)
    assert (a.config.calib.nsamples, a.config.calib.seqlen) == (8, 128)
    assert gg.config.types == ["q4_k_m", "q8_0"] and gg.config.imatrix and gg.config.nsamples == 16
    assert o.config.int4 and o.config.block_size == 64 and o.backends == ["onnxruntime"]
    assert g.backends == ["torch"] and gg.backends == ["llama.cpp"]
    assert r.thresholds == {"max_ppl_increase": 0.02, "max_kl": 0.05} and r.eval.ctx == 128


@pytest.mark.parametrize("text, line, words", [
    (GOOD + "    bitz: 4\n", 10, ["artifacts.0.bitz", "unknown option", "bits"]),
    (GOOD + "    group_size: big\n", 10, ["artifacts.0.group_size", "'big' is not a int"]),
    (GOOD + "    bits: 5\n", 7, ["--bits 5"]),
    (GOOD + "    backends: [llama.cpp]\n", 10, ["artifacts.0.backends.0", "cannot be validated on 'llama.cpp'"]),
    (GOOD + "  - {name: x, type: gguf, types: [q9_z]}\n", 10, ["artifacts.1.types", "q9_z"]),
    (GOOD + "  - {name: g4, type: rtn}\n", 10, ["duplicate artifact name"]),
    (GOOD + "  - {name: x, type: exl2}\n", 10, ["unknown artifact type 'exl2'"]),
    (GOOD + "colour: red\n", 10, ["colour: unknown key"]),
    (GOOD + "thresholds: {max_ppl: 1}\n", 10, ["thresholds.max_ppl", "unknown threshold"]),
    (GOOD.replace("ctx: 128", "ctx: 4"), 5, ["evaluation", "--ctx 4"]),
    (GOOD.replace("  model: ./m\n", "  convert: yes\n"), 2, ["source", "missing required key 'model'"]),
    (GOOD + "    x: @bad\n", 10, ["not valid YAML"]),
])
def test_errors_name_key_and_line(text, line, words):
    with pytest.raises(QuantError) as exc:
        parse_recipe(text, "bad.yaml")
    msg = str(exc.value)
    assert msg.startswith(f"bad.yaml:{line}:"), msg
    for w in words:
        assert w in msg, msg


def test_load_recipe_model_override_and_smoke(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(GOOD)
    r = load_recipe(p, model="fixture:qwen2-tiny-untied", smoke=True)
    assert r.source.model == "fixture:qwen2-tiny-untied"
    assert (r.calib.nsamples, r.calib.seqlen, r.eval.ctx) == (8, 64, 64)
    assert r.artifacts[0].config.calib.nsamples == 8
    with pytest.raises(QuantError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_fingerprints_follow_content(tmp_path):
    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text("{}")
    a = st.path_fingerprint(m)
    (m / "config.json").write_text('{"x": 1}')
    assert st.path_fingerprint(m) != a
    assert st.data_fingerprint("hf:wikitext2") != st.data_fingerprint("hf:c4")
    s = st.State(tmp_path / "out")
    s.set_artifact("x", {"build_key": "k", "outputs": [str(m)], "outputs_fp": st.outputs_fingerprint([str(m)])})
    assert st.State(tmp_path / "out").built("x", "k") and not s.built("x", "other")
    (m / "new.bin").write_bytes(b"1")
    assert not st.State(tmp_path / "out").built("x", "k")  # an output changed since: rebuild
