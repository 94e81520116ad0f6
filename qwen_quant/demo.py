"""The embedded default: run `recipes/demo.yaml` (GPTQ, AWQ, GGUF, ONNX of the small default model)."""

from __future__ import annotations

from pathlib import Path

from qwen_quant.report import Report
from qwen_quant.resources import recipe

DEMO_RECIPE = recipe("demo.yaml")


def run_demo(workdir: Path) -> Report:
    """Build (or reuse) every artifact of the demo recipe under ``workdir`` and return the combined report.

    Artifacts already built with the same inputs are skipped, so a second `qwen-quant demo` is fast.
    """
    from qwen_quant.progress import log
    from qwen_quant.recipe import RunConfig, load_recipe, run_recipe

    outcome = run_recipe(load_recipe(DEMO_RECIPE), RunConfig(output=str(workdir)))
    log(f"report: {Path(workdir) / 'report.json'} and report.md; statuses: "
        + ", ".join(f"{k} {v}" for k, v in outcome.statuses.items()))
    return outcome.report
