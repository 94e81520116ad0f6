"""qwen-quant check: regressions exit 1 naming artifact/backend/metric, unusable input exits 2.

The planted regression on real artifacts (a damaged GGUF) is in test_recipe_run.py, which has the
demo artifacts at hand; these tests use small synthetic reports in the common schema.
"""

from __future__ import annotations

import copy
import json

import pytest

from qwen_quant.check import compare, result_key
from qwen_quant.report import validate_report


def _res(name, kind, backend, ppl, kl=0.01, top1=0.95, sha="a" * 64):
    return {"artifact": {"path": f"/x/{name}", "format": "gptq", "type": kind, "size_bytes": 10},
            "backend": {"name": backend, "device": "cpu", "dtype": "float32", "versions": {}},
            "dataset": {"name": "shipped", "sha256": sha, "n_tokens": 100}, "ctx": 64, "ppl_method": "windows",
            "metrics": {"perplexity": ppl, "tokens_scored": 4000, "ppl_ratio": ppl / 10, "kl_mean": kl, "top1_agreement": top1},
            "wall_time_s": 1.0, "reference": None, "extra": {"artifact": name}}


def _report(results, arts=None):
    d = {"schema": "qwen-quant/report/v1", "tool": {"name": "qwen-quant", "version": "0"}, "created": "now",
         "results": results, "extra": {}}
    if arts is not None:
        d["extra"]["recipe"] = {"artifacts": arts}
    validate_report(d)
    return d


@pytest.fixture
def base():
    return _report([_res("g4", "gptq-int4", "torch", 10.5), _res("gguf", "gguf-q8_0", "llama.cpp", 10.1)],
                   [{"name": "g4", "status": "ok", "thresholds": {"max_kl": 0.05}, "backends": ["torch"]},
                    {"name": "gguf", "status": "ok", "thresholds": {}, "backends": ["llama.cpp"]}])


def _write(tmp_path, name, d):
    p = tmp_path / name
    p.write_text(json.dumps(d))
    return p


def test_same_report_passes_and_regression_fails(run_cli, tmp_path, base):
    b = _write(tmp_path, "base.json", base)
    code, out, _ = run_cli("check", b, "--baseline", b)
    assert code == 0 and "no regression" in out
    worse = copy.deepcopy(base)
    worse["results"][1]["metrics"]["perplexity"] = 10.3  # +2% on gguf q8_0
    code, out, _ = run_cli("check", _write(tmp_path, "now.json", worse), "--baseline", b)
    assert code == 1
    line = next(ln for ln in out.splitlines() if ln.startswith("REGRESSION"))
    assert "gguf [gguf-q8_0]" in line and "llama.cpp" in line and "perplexity" in line and "10.1" in line and "10.3" in line
    assert "+1.00%" in line
    code, _, _ = run_cli("check", _write(tmp_path, "now.json", worse), "--baseline", b, "--max-ppl-increase", "5%")
    assert code == 0


def test_recipe_thresholds_and_flags(tmp_path, base, run_cli):
    now = copy.deepcopy(base)
    now["results"][0]["metrics"]["kl_mean"] = 0.08  # over the recipe's max_kl 0.05 for g4
    f = [x for x in compare(now, None) if x.regressed]
    assert [(x.artifact, x.backend, x.metric) for x in f] == [("g4 [gptq-int4]", "torch", "kl_mean")]
    p = _write(tmp_path, "now.json", now)
    assert run_cli("check", p)[0] == 1
    assert run_cli("check", p, "--max-kl", "0.1")[0] == 0  # the flag overrides the recipe
    code, out, _ = run_cli("check", p, "--max-kl", "0.1", "--min-top1", "0.99")
    assert code == 1 and "top1_agreement" in out


def test_missing_and_failed_artifacts_are_regressions(base):
    now = copy.deepcopy(base)
    now["results"].pop(1)
    now["extra"]["recipe"]["artifacts"][1].update(status="failed", error="llama.cpp crashed")
    bad = [x for x in compare(now, base) if x.regressed]
    assert {(x.artifact, x.metric) for x in bad} == {("gguf [gguf-q8_0]", "result"), ("gguf", "status")}
    assert result_key(base["results"][0]) == ("g4", "gptq-int4", "torch")


def test_unusable_input_exits_2(run_cli, tmp_path, base):
    b = _write(tmp_path, "base.json", base)
    assert run_cli("check", tmp_path / "nope.json", "--baseline", b)[0] == 2
    (tmp_path / "bad.json").write_text("{not json")
    code, _, err = run_cli("check", tmp_path / "bad.json")
    assert code == 2 and "not valid JSON" in err
    (tmp_path / "schema.json").write_text(json.dumps({"schema": "qwen-quant/report/v1", "results": []}))
    code, _, err = run_cli("check", tmp_path / "schema.json")
    assert code == 2 and "schema" in err
    other = copy.deepcopy(base)
    other["results"][0]["dataset"]["sha256"] = "b" * 64
    code, _, err = run_cli("check", _write(tmp_path, "other.json", other), "--baseline", b)
    assert code == 2 and "dataset sha256 differs" in err and "g4" in err
    code, _, err = run_cli("check", b, "--max-ppl-increase", "1%")
    assert code == 2 and "--baseline" in err


def test_update_baseline_writes_the_report(run_cli, tmp_path, base):
    worse = copy.deepcopy(base)
    worse["results"][0]["metrics"]["perplexity"] = 20.0
    now, b = _write(tmp_path, "now.json", worse), tmp_path / "ci" / "baseline.json"
    code, out, _ = run_cli("check", now, "--baseline", b, "--update-baseline")
    assert code == 0 and json.loads(b.read_text()) == worse
    assert run_cli("check", now, "--baseline", b)[0] == 0


def test_default_gate_covers_kl_and_top1(run_cli, tmp_path, base):
    """With a baseline: KL +10% on a CPU backend (above a 0.0002 floor) and a 0.5-point top-1 drop fail even when perplexity holds."""
    b = _write(tmp_path, "base.json", base)
    kl = copy.deepcopy(base)
    kl["results"][0]["metrics"]["kl_mean"] = 0.11  # 11x the baseline's 0.01, perplexity unchanged
    code, out, _ = run_cli("check", _write(tmp_path, "kl.json", kl), "--baseline", b)
    line = next(ln for ln in out.splitlines() if ln.startswith("REGRESSION"))
    assert code == 1 and "kl_mean" in line and "g4" in line and "+10%" in line and "zero-noise" in line
    small = copy.deepcopy(base)
    small["results"][1]["metrics"]["kl_mean"] = 0.0105  # +5%: within the relative limit
    assert run_cli("check", _write(tmp_path, "small.json", small), "--baseline", b)[0] == 0
    tiny = copy.deepcopy(base)
    for r in (tiny, base):
        r["results"][1]["metrics"]["kl_mean"] = 1e-5 if r is base else 1.5e-4  # 15x, but under the 2e-4 floor
    assert run_cli("check", _write(tmp_path, "tiny.json", tiny), "--baseline", _write(tmp_path, "b2.json", base))[0] == 0
    top = copy.deepcopy(base)
    top["results"][1]["metrics"]["top1_agreement"] = 0.94  # -1 point
    code, out, _ = run_cli("check", _write(tmp_path, "top.json", top), "--baseline", b)
    assert code == 1 and "top1_agreement" in out and "points" in out
    assert run_cli("check", _write(tmp_path, "top.json", top), "--baseline", b, "--max-top1-drop", "2")[0] == 0
    code, _, err = run_cli("check", b, "--max-top1-drop", "2")
    assert code == 2 and "--baseline" in err


def test_type_defaults_without_baseline(base):
    """No baseline, no recipe limits: each artifact class has absolute limits (60x perplexity fails)."""
    from qwen_quant.check import artifact_class

    now = copy.deepcopy(base)
    now["extra"] = {}
    assert not [x for x in compare(now, None) if x.regressed]
    now["results"][1]["metrics"]["ppl_ratio"] = 60.0
    bad = [x for x in compare(now, None) if x.regressed]
    assert [(x.artifact, x.metric) for x in bad] == [("gguf [gguf-q8_0]", "ppl_ratio")]
    assert [artifact_class(r) for r in now["results"]] == ["4bit", "8bit"]
    assert artifact_class({"artifact": {"format": "gguf"}, "backend": {"dtype": "q3_k_m"}}) == "low"
    assert artifact_class({"artifact": {"format": "hf"}, "backend": {"dtype": "float32"}}) == "float"


def test_nothing_to_check_is_an_input_error(run_cli, tmp_path, base):
    bare = copy.deepcopy(base)
    bare["extra"] = {}
    for r in bare["results"]:
        r["metrics"] = {"perplexity": r["metrics"]["perplexity"], "tokens_scored": 50}  # evaluated without --reference
    code, _, err = run_cli("check", _write(tmp_path, "bare.json", bare))
    assert code == 2 and "nothing to check" in err and "--baseline" in err


def test_metadata_mismatch_fails_with_one_line(run_cli, tmp_path, base):
    now = copy.deepcopy(base)
    ok = {"name": "rope_theta", "ok": True, "expected": 1e6, "actual": 1e6, "reason": ""}
    bad = {"name": "eos_token_id", "ok": False, "expected": [151643], "actual": [2],
           "reason": "gguf: eos token id [2] in GGUF keys is not one the source declares ([151643])"}
    now["results"][1]["metadata"] = {"ok": False, "checks": [ok, bad]}
    now["results"][0]["metadata"] = {"ok": True, "checks": [ok]}
    validate_report(now)
    b = _write(tmp_path, "base.json", base)
    code, out, _ = run_cli("check", _write(tmp_path, "md.json", now), "--baseline", b)
    lines = [ln for ln in out.splitlines() if ln.startswith("REGRESSION")]
    assert code == 1 and len(lines) == 1
    assert lines[0].startswith("REGRESSION: gguf [gguf-q8_0] on llama.cpp: metadata: gguf: eos token id [2]")


def test_top1_drop_needs_more_than_one_token_flip(run_cli, tmp_path, base):
    """On 100 scored tokens one flip is a whole point: the 0.5-point default cannot fail on a single flip."""
    for r in base["results"]:
        r["metrics"]["tokens_scored"] = 100
    b = _write(tmp_path, "base.json", base)
    one = copy.deepcopy(base)
    one["results"][0]["metrics"]["top1_agreement"] = 0.94  # one token of 100
    assert run_cli("check", _write(tmp_path, "one.json", one), "--baseline", b)[0] == 0
    one["results"][0]["metrics"]["top1_agreement"] = 0.93  # two tokens
    assert run_cli("check", _write(tmp_path, "two.json", one), "--baseline", b)[0] == 1
