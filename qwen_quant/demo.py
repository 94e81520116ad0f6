"""The embedded default: build (or reuse) the small default model and run the main job on it."""

from __future__ import annotations

from pathlib import Path

from qwen_quant.report import Report


def run_demo(workdir: Path) -> Report:
    """Quantize the default fixture with GPTQ int4 and validate it against the full-precision model."""
    from qwen_quant.progress import log
    from qwen_quant.testing.fixtures import DEFAULT_FIXTURE, fixture_path
    from qwen_quant.validate import EvalConfig, run_eval

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = fixture_path(DEFAULT_FIXTURE)
    log(f"default model: {model}")
    cfg = EvalConfig(ctx=256, max_tokens=8192, greedy_tokens=24)
    report = Report()
    report.results.append(run_eval(model, cfg, reference=model))
    report.write_json(workdir / "qwen-quant-report.json")
    return report
