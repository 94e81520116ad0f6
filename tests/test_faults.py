"""The gate catches planted faults: seeded damage to real artifacts of every type, through `eval` + `check`.

Faults come from `qwen_quant.faults.plant` (seeded, so no test depends on one damaged byte):
metadata faults (tokenizer, pre-tokenizer, special ids, chat template, rope/eps/context) and small
numeric damage pass `eval` (exit 0) and fail `check` (exit 1) with one line naming the artifact;
truncation and config/tensor mismatches fail `eval` itself with one line and exit 2. Clean artifacts
pass `check` in repeated runs. The default set covers every fault class and every artifact type;
the full matrix (every fault on every type, several seeds) is marked slow.
"""

from __future__ import annotations

import pytest

from gate_helpers import TYPES, artifact, clean_report, eval_json, workdir
from qwen_quant.faults.plant import CONFIG_VARIANTS, EXPECT, plant

# every fault class once, every type at least once; metadata faults on the runtime that reads them most
# differently (llama.cpp's own tokenizer, genai_config), numeric damage on each backend. Unusable inputs
# fail at load in well under a second, so they run on every type; the full matrix is slow.
DEFAULT = [("tokenizer", "gguf"), ("pretokenizer", "onnx"), ("special_tokens", "awq"), ("template", "gguf"),
           ("rope", "gptq"), ("eps", "gguf"), ("context", "onnx"), ("numeric", "ct"), ("numeric", "gguf"),
           ("numeric", "onnx")]
FULL = [(f, t) for f in EXPECT for t in TYPES if f not in ("truncate", "config") and (f, t) not in DEFAULT]


def _one_line(text: str, name: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, text
    assert name in lines[0], (name, lines[0])
    return lines[0]


def _caught(run_cli, fault: str, kind: str, seed: int = 0):
    src = artifact(kind)
    f = plant(src, fault, workdir() / f"{fault}-{kind}-{seed}" / src.name, seed=seed)
    out = f.path.parent / "report.json"
    code, err, report = eval_json(run_cli, f.path, out)
    if f.expect == "unusable":
        assert code == 2, (f.detail, code, err)
        return _one_line(err, src.name)
    assert code == 0, (f.detail, err)
    code, stdout, err = run_cli("check", out, "--baseline", clean_report(kind))
    assert code == 1, (f.detail, stdout, report["results"][0].get("metadata"), report["results"][0]["metrics"])
    bad = [ln for ln in stdout.splitlines() if ln.startswith("REGRESSION")]
    assert bad and all(src.name in ln for ln in bad), (f.detail, stdout)
    if f.expect == "metadata":
        assert any(": metadata: " in ln for ln in bad), (f.detail, stdout)
        assert run_cli("check", out)[0] == 1  # caught without a baseline too
    else:
        assert all(": metadata" not in ln for ln in bad), (f.detail, stdout)  # numbers moved, metadata did not
    return bad[0]


@pytest.mark.parametrize("fault,kind", DEFAULT, ids=[f"{f}-{k}" for f, k in DEFAULT])
def test_fault_is_caught(run_cli, fault, kind):
    _caught(run_cli, fault, kind)


@pytest.mark.parametrize("kind", TYPES)
def test_truncated_artifact_is_unusable(run_cli, kind):
    line = _caught(run_cli, "truncate", kind, seed=TYPES.index(kind))
    assert "truncat" in line or "corrupt" in line or "cannot load" in line, line


@pytest.mark.parametrize("kind,variant", [("gptq", v) for v in CONFIG_VARIANTS["hf"]] + [("awq", "bits"), ("ct", "bits"),
                         ("ct", "group_size"), ("awq", "scales_shape")] + [("gguf", v) for v in CONFIG_VARIANTS["gguf"]]
                         + [("onnx", v) for v in CONFIG_VARIANTS["onnx"]])
def test_config_contradicting_tensors_is_unusable(run_cli, kind, variant):
    src = artifact(kind)
    f = plant(src, "config", workdir() / f"config-{kind}-{variant}" / src.name, variant=variant)
    code, err, _ = eval_json(run_cli, f.path, f.path.parent / "report.json")
    assert code == 2, (f.detail, err)
    line = _one_line(err, src.name)
    word = {"bits": "bits", "group_size": "group_size", "vocab": "vocab", "lm_head": "lm_head",
            "intermediate": "intermediate", "scales_shape": "scale"}.get(variant, variant)
    assert word in line or (variant == "intermediate" and "qweight" in line), line


@pytest.mark.parametrize("kind", ["gguf", "onnx", pytest.param("gptq", marks=pytest.mark.slow),
                                  pytest.param("awq", marks=pytest.mark.slow), pytest.param("ct", marks=pytest.mark.slow)])
def test_clean_artifact_passes_repeated_runs(run_cli, kind):
    """A second clean eval passes `check` against the first, and both pass without a baseline (class defaults).

    By default on the runtimes outside torch (llama.cpp, onnxruntime); torch on the CPU is bit-repeatable
    (bench/gate_noise.py), so its repeats are in the slow set.
    """
    first, again = clean_report(kind), clean_report(kind, run=1)
    code, out, _ = run_cli("check", again, "--baseline", first)
    assert code == 0, (kind, out)
    for report in (first, again):
        code, out, _ = run_cli("check", report)
        assert code == 0, (kind, out)


@pytest.mark.slow
@pytest.mark.parametrize("fault,kind", FULL, ids=[f"{f}-{k}" for f, k in FULL])
@pytest.mark.parametrize("seed", [0, 1])
def test_fault_matrix(run_cli, fault, kind, seed):
    _caught(run_cli, fault, kind, seed)
