"""Recipe runner bookkeeping with stand-in build/validate: skip, rebuild, continue past failures, resume after Ctrl-C."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwen_quant.errors import QuantError
from qwen_quant.recipe import RunConfig, parse_recipe, run_recipe
from qwen_quant.recipe import runner
from qwen_quant.report import validate_report

RECIPE = """\
name: fake
source: {model: MODEL}
evaluation: {ctx: 64}
thresholds: {max_kl: 0.1}
artifacts:
  - {name: a, type: gptq, bits: 4}
  - {name: b, type: gguf, types: [q8_0, q4_k_m], thresholds: {max_kl: 0.5}}
  - {name: c, type: onnx, int4: true}
"""


def _result(path: str, kind: str, backend: str, name: str) -> dict:
    return {"artifact": {"path": path, "format": "x", "type": kind, "size_bytes": 1},
            "backend": {"name": backend, "device": "cpu", "dtype": "float32", "versions": {}},
            "dataset": {"name": "shipped", "sha256": "0" * 64, "n_tokens": 100}, "ctx": 64, "ppl_method": "windows",
            "metrics": {"perplexity": 10.0, "tokens_scored": 10, "kl_mean": 0.01}, "wall_time_s": 0.1,
            "reference": None, "extra": {"artifact": name}}


@pytest.fixture
def fake(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    calls = {"build": [], "validate": [], "fail": set(), "interrupt": set()}

    def build(spec, src, outdir, device):
        calls["build"].append(spec.name)
        if spec.name in calls["fail"]:
            raise QuantError(f"{spec.name} cannot be built")
        if spec.name in calls["interrupt"]:
            raise KeyboardInterrupt
        target = outdir / spec.name
        target.mkdir(exist_ok=True)
        (target / "w.bin").write_bytes(b"x" * 10)
        return [(str(target), runner._type_name(spec, t)) for t in (spec.config.types if spec.type == "gguf" else [None])]

    def validate(spec, outputs, src, recipe):
        calls["validate"].append(spec.name)
        return [_result(p, k, b, spec.name) for p, k in outputs for b in spec.backends]

    monkeypatch.setattr(runner, "build", build)
    monkeypatch.setattr(runner, "validate", validate)
    return parse_recipe(RECIPE.replace("MODEL", str(model)), "fake.yaml"), calls, tmp_path / "out"


def test_builds_then_skips_and_writes_one_report(fake):
    recipe, calls, out = fake
    o = run_recipe(recipe, RunConfig(output=str(out)))
    assert o.statuses == {"a": "ok", "b": "ok", "c": "ok"} and calls["build"] == ["a", "b", "c"]
    d = json.loads((out / "report.json").read_text())
    validate_report(d)
    assert [(r["artifact"]["type"], r["backend"]["name"]) for r in d["results"]] == [
        ("gptq-int4", "torch"), ("gguf-q8_0", "llama.cpp"), ("gguf-q4_k_m", "llama.cpp"), ("onnx-int4", "onnxruntime")]
    arts = {a["name"]: a for a in d["extra"]["recipe"]["artifacts"]}
    assert arts["a"]["thresholds"] == {"max_kl": 0.1} and arts["b"]["thresholds"] == {"max_kl": 0.5}
    md = (out / "report.md").read_text()
    assert "| a | gptq | ok |" in md and "gguf-q4_k_m" in md and "MiB" in md

    o = run_recipe(recipe, RunConfig(output=str(out)))
    assert set(o.statuses.values()) == {"cached"} and calls["build"] == ["a", "b", "c"]
    assert len(o.report.results) == 4

    recipe.artifacts[0].config.bits = 8  # changed options: only that artifact is rebuilt
    (out / "c" / "w.bin").write_bytes(b"changed")  # a touched output: rebuilt too
    o = run_recipe(recipe, RunConfig(output=str(out)))
    assert calls["build"][3:] == ["a", "c"] and o.statuses["b"] == "cached"

    recipe.eval.ctx = 32  # same builds, new evaluation settings: validate only
    run_recipe(recipe, RunConfig(output=str(out), only=["b"]))
    assert calls["build"][5:] == [] and calls["validate"][-1] == "b"


def test_failure_is_reported_and_the_rest_still_runs(fake):
    recipe, calls, out = fake
    calls["fail"].add("b")
    o = run_recipe(recipe, RunConfig(output=str(out)))
    assert o.statuses == {"a": "ok", "b": "failed", "c": "ok"} and o.failed == ["b"]
    arts = {a["name"]: a for a in o.report.extra["recipe"]["artifacts"]}
    assert arts["b"]["status"] == "failed" and "cannot be built" in arts["b"]["error"]
    calls["fail"].clear()
    o = run_recipe(recipe, RunConfig(output=str(out)))
    assert o.statuses == {"a": "cached", "b": "ok", "c": "cached"}


def test_ctrl_c_leaves_a_state_that_resumes(fake):
    recipe, calls, out = fake
    calls["interrupt"].add("b")
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, RunConfig(output=str(out)))
    state = json.loads((out / "recipe-state.json").read_text())
    assert state["artifacts"]["a"]["status"] == "ok" and state["artifacts"]["b"]["status"] == "interrupted"
    assert json.loads((out / "report.json").read_text())["extra"]["recipe"]["artifacts"][2]["status"] == "not run"
    calls["interrupt"].clear()
    o = run_recipe(recipe, RunConfig(output=str(out)))
    assert o.statuses == {"a": "cached", "b": "ok", "c": "ok"} and calls["build"] == ["a", "b", "b", "c"]


def test_only_unknown_name_is_an_error(fake):
    recipe, _, out = fake
    with pytest.raises(QuantError, match="no artifact named 'zz'"):
        run_recipe(recipe, RunConfig(output=str(out), only=["zz"]))
