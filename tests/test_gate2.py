"""The gate beyond the eval text: whole tokenizer tables, flags, every chat-template source, declared special
tokens, generation defaults, crash-safe GGUF tokenizers, per-backend limits with greedy gating, and
results matched by role or --match.

Each planted fault (`qwen_quant.faults.faults_gate`) goes through `eval` and then `check` against the
clean artifact's report: metadata faults pass `eval` and fail `check` (exit 1, one REGRESSION line naming
the artifact); contradictory GGUF tokenizers fail `eval` (exit 2, one line naming file and field),
also when run as a separate process, with no signal, native backtrace or Python traceback. HF checkpoint
types share one tokenizer-file path, so the default set plants each class once per file kind (HF, ONNX,
GGUF); every HF type is in the slow set.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gate_helpers import EVAL_ARGS, artifact, clean_report, eval_json, reference, workdir
from qwen_quant.faults.faults_gate import APPLIES, GATE_EXPECT, plant_gate

REPO = Path(__file__).resolve().parents[1]
DEFAULT = [("rare_tokens", "gguf"), ("rare_tokens", "onnx"), ("rare_tokens", "gptq"), ("add_bos", "gguf"),
           ("add_bos", "awq"), ("add_bos", "onnx"), ("config_template", "ct"), ("config_template", "onnx"),
           ("eos_token", "gptq"), ("eos_token", "onnx"), ("sampling", "awq"), ("sampling", "onnx")]
KIND = {"gptq": "hf", "awq": "hf", "ct": "hf", "onnx": "onnx", "gguf": "gguf"}
FULL = [(f, t) for f, e in GATE_EXPECT.items() if e == "metadata" for t in KIND if KIND[t] in APPLIES[f]
        and (f, t) not in DEFAULT]
WORDS = {"rare_tokens": ("tokenizer.ggml.tokens", "tokenizer.json"), "add_bos": ("add_bos_token",),
         "config_template": ("tokenizer_config.json",), "eos_token": ("eos_token",), "sampling": ("temperature",)}


def _planted(fault: str, kind: str) -> Path:
    src = artifact(kind)
    out = workdir() / f"gate2-{fault}-{kind}" / src.name
    plant_gate(src, fault, out)
    return out


def _metadata_caught(run_cli, fault, kind):
    path = _planted(fault, kind)
    out = path.parent / "report.json"
    code, err, report = eval_json(run_cli, path, out)
    assert code == 0, (fault, kind, err)
    code, stdout, _ = run_cli("check", out, "--baseline", clean_report(kind))
    bad = [ln for ln in stdout.splitlines() if ln.startswith("REGRESSION")]
    assert code == 1 and bad, (fault, kind, stdout)
    assert all(path.name in ln and ": metadata: " in ln for ln in bad), stdout
    assert any(w in ln for w in WORDS[fault] for ln in bad), (fault, stdout)
    return bad


@pytest.mark.parametrize("fault,kind", DEFAULT, ids=[f"{f}-{k}" for f, k in DEFAULT])
def test_table_flag_template_special_generation_faults_are_caught(run_cli, fault, kind):
    _metadata_caught(run_cli, fault, kind)


@pytest.mark.slow
@pytest.mark.parametrize("fault,kind", FULL, ids=[f"{f}-{k}" for f, k in FULL])
def test_gate_fault_matrix(run_cli, fault, kind):
    _metadata_caught(run_cli, fault, kind)


def test_generation_difference_can_be_allowed(run_cli):
    path = _planted("sampling", "onnx")
    out = path.parent / "report.json"
    assert eval_json(run_cli, path, out)[0] == 0
    base = clean_report("onnx")
    assert run_cli("check", out, "--baseline", base)[0] == 1
    code, stdout, _ = run_cli("check", out, "--baseline", base, "--allow", "generation do_sample",
                              "--allow", "generation temperature")
    assert code == 0, stdout


def _cli_subprocess(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=600)


@pytest.mark.parametrize("fault,field", [("vocab_crash", "tokenizer"), ("token_types", "tokenizer.ggml.eos_token_id")])
def test_contradictory_gguf_tokenizer_is_one_line_exit_2(fault, field):
    """llama.cpp aborts (SIGABRT) on a tokenizer model that contradicts the token list: the CLI must not."""
    path = _planted(fault, "gguf")
    done = _cli_subprocess("eval", path, "-r", reference(), *EVAL_ARGS, "--json", path.parent / "r.json")
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr and "backtrace" not in done.stderr.lower(), done.stderr[-2000:]
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and path.name in errors[0] and field in errors[0], done.stderr[-2000:]


# ---- per-backend limits, greedy gating, matching ------------------------------------------------

def _report(name="tiny-onnx", backend="onnxruntime", device="cpu", kl=0.0113, top1=0.927, exact=4, prefix=20.0,
            type_="onnx-int4"):
    return {"artifact": {"path": f"/x/{name}", "format": "onnx", "type": type_, "size_bytes": 1},
            "backend": {"name": backend, "device": device, "dtype": "int4", "versions": {}},
            "dataset": {"name": "shipped", "sha256": "a" * 64, "n_tokens": 2048}, "ctx": 128, "ppl_method": "windows",
            "metrics": {"perplexity": 5.0, "ppl_ratio": 1.01, "kl_mean": kl, "top1_agreement": top1,
                        "tokens_scored": 2032, "greedy_prompts": 12, "greedy_tokens": 32, "greedy_exact": exact,
                        "greedy_prefix_mean": prefix},
            "wall_time_s": 1.0, "reference": None}


def _write(tmp_path: Path, name: str, results: list[dict]) -> Path:
    from qwen_quant.report import validate_report

    d = {"schema": "qwen-quant/report/v1", "tool": {"name": "qwen-quant", "version": "0"}, "created": "now",
         "results": results, "extra": {}}
    validate_report(d)
    p = tmp_path / name
    p.write_text(json.dumps(d))
    return p


def test_small_numeric_damage_on_a_noisy_baseline_fails_on_zero_noise_backends(run_cli, tmp_path):
    """ONNX int4, one layer's scales x1.1: KL +22%, top-1 -0.49 points, greedy exact 4 -> 2 of 12."""
    base = _write(tmp_path, "base.json", [_report()])
    bad = _write(tmp_path, "bad.json", [_report(kl=0.0113 * 1.22, top1=0.927 - 0.0049, exact=2, prefix=15.0)])
    code, out, _ = run_cli("check", bad, "--baseline", base)
    lines = [ln for ln in out.splitlines() if ln.startswith("REGRESSION")]
    assert code == 1 and {m for m in ("kl_mean", "greedy_exact", "greedy_prefix_mean") if any(m in ln for ln in lines)} \
        == {"kl_mean", "greedy_exact", "greedy_prefix_mean"}, out
    assert all("zero-noise" in ln for ln in lines if "kl_mean" in ln), out
    kl_only = _write(tmp_path, "kl.json", [_report(kl=0.0113 * 1.22)])
    assert run_cli("check", kl_only, "--baseline", base)[0] == 1
    # the same KL growth on a backend whose noise is not measured: within the looser limit
    nb = _write(tmp_path, "nb.json", [_report(backend="vllm", kl=0.0113)])
    nn = _write(tmp_path, "nn.json", [_report(backend="vllm", kl=0.0113 * 1.22)])
    assert run_cli("check", nn, "--baseline", nb)[0] == 0
    assert run_cli("check", base, "--baseline", base)[0] == 0


def test_renamed_copy_is_matched_by_role(run_cli, tmp_path):
    """A re-evaluated copy in a folder of another name is compared, not reported missing."""
    import shutil

    src = artifact("gguf")
    copy_ = workdir() / "gate2-renamed" / f"renamed-{src.name}"
    copy_.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, copy_)
    out = copy_.parent / "report.json"
    assert eval_json(run_cli, copy_, out)[0] == 0
    code, stdout, _ = run_cli("check", out, "--baseline", clean_report("gguf"))
    assert code == 0 and "missing" not in stdout, stdout
    worse = json.loads(out.read_text())
    worse["results"][0]["metrics"]["kl_mean"] += 0.01  # well over the 2e-4 floor (q8_0 KL is ~1e-4)
    w = _write(tmp_path, "worse.json", worse["results"])
    code, stdout, _ = run_cli("check", w, "--baseline", clean_report("gguf"))
    assert code == 1 and "kl_mean" in stdout and "missing" not in stdout, stdout


def test_match_maps_names_and_nothing_matched_is_exit_2(run_cli, tmp_path):
    base = _write(tmp_path, "base.json", [_report(name="a", type_="gguf-q8_0", backend="llama.cpp")])
    other = _write(tmp_path, "other.json", [_report(name="b", type_="onnx-int4")])
    code, _, err = run_cli("check", other, "--baseline", base)
    assert code == 2 and "b [onnx-int4]" in err and "a [gguf-q8_0]" in err and "--match" in err, err
    now = _write(tmp_path, "now.json", [_report(name="b", type_="gguf-q8_0", backend="llama.cpp", kl=0.05)])
    code, out, _ = run_cli("check", now, "--baseline", base, "--match", "b=a")
    assert code == 1 and "kl_mean" in out, out
    code, _, err = run_cli("check", now, "--baseline", base, "--match", "zzz=a")
    assert code == 2 and "zzz" in err, err


def test_top1_ties_count_as_agreement():
    import torch

    from qwen_quant.validate.metrics import window_scores
    from qwen_quant.validate.topk import TopKLogprobs

    ref = torch.tensor([[1.0, 3.0, 3.0, 0.0], [0.0, 1.0, 2.0, 5.0]])
    test = torch.tensor([[1.0, 2.9, 3.0, 0.0], [0.0, 5.0, 2.0, 1.0]])  # row 0: a tie in ref, broken the other way
    t = torch.tensor([1, 3])
    assert window_scores(test, t, ref)[2].tolist() == [True, False]
    assert TopKLogprobs.from_dense(test, 2, t).window_scores(t, ref)[2].tolist() == [True, False]
    assert window_scores(ref, t, ref)[2].tolist() == [True, True]


@pytest.mark.parametrize("kind", ["gptq", "awq", "ct", "gguf", "onnx"])
def test_clean_artifact_passes_the_new_checks_in_repeated_runs(run_cli, kind):
    """No false alarm from the table/flag/template/generation checks or the tighter limits on a clean re-run."""
    out = workdir() / f"gate2-clean-{kind}.json"
    code, err, report = eval_json(run_cli, artifact(kind), out)
    assert code == 0, err
    md = report["results"][0]["metadata"]
    assert md["ok"], [c for c in md["checks"] if not c["ok"]]
    assert any(c["name"].startswith(("tokenizer vocabulary", "tokenizer.ggml.tokens")) for c in md["checks"])
    code, stdout, _ = run_cli("check", out, "--baseline", clean_report(kind))
    assert code == 0 and "missing" not in stdout, stdout
