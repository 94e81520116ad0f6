"""docs/ci-example.yml works as written: its `run:` steps, run in order in a fresh folder.

The fast test checks that every qwen-quant command line in it parses with today's CLI. The slow one runs
the steps with bash (setup skipped: this venv is the set-up one; the recipe swapped for a one-artifact
recipe of the same model, so it takes a minute): first without a baseline (gate on absolute limits, write
out/baseline.json), then with it committed as ci/baseline.json.
"""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "docs" / "ci-example.yml"


def _job():
    return yaml.safe_load(WORKFLOW.read_text())["jobs"]["quantize"]


def _runs() -> list[str]:
    return [s["run"] for s in _job()["steps"] if "run" in s]


def test_every_qwen_quant_line_parses():
    import typer

    from cli import app

    group = typer.main.get_command(app)
    lines = [ln.strip() for run in _runs() for ln in run.splitlines() if ".venv/bin/qwen-quant" in ln]
    assert len(lines) >= 4
    for line in lines:
        args = shlex.split(line)[1:]
        ctx = group.make_context("qwen-quant", list(args), resilient_parsing=False)
        name, cmd, rest = group.resolve_command(ctx, args)
        with cmd.make_context(name, rest, parent=ctx) as sub:  # raises on an unknown option or bad value
            assert sub.command is cmd
    steps = [s.get("name") for s in _job()["steps"]]
    assert steps.index("Qwen2 tokenizer") < steps.index("Build and validate every artifact of the recipe")
    assert "QWEN_QUANT_TOKENIZER" in _job()["env"]


TINY_RECIPE = """name: demo
source:
  model: fixture:qwen2-tiny-tied
calibration: {source: shipped, nsamples: 8, seqlen: 64}
evaluation: {ctx: 64, max_tokens: 512, greedy_tokens: 4, max_prompts: 2}
thresholds: {max_ppl_ratio: 1.5}
artifacts:
  - {name: gptq-int4, type: gptq, bits: 4, group_size: 128, backends: [torch]}
"""


def _run_steps(work: Path, env: dict) -> None:
    for run in _runs():
        if run.strip() == "bash scripts/setup.sh":
            continue
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", run], cwd=work, env=env, capture_output=True, text=True)
        assert r.returncode == 0, f"{run}\n{r.stdout[-1500:]}\n{r.stderr[-1500:]}"


@pytest.mark.slow
def test_workflow_steps_run_first_without_then_with_baseline(tmp_path):
    from qwen_quant.resources import tokenizer_dir

    work = tmp_path / "repo"
    (work / "recipes").mkdir(parents=True)
    (work / "recipes" / "demo.yaml").write_text(TINY_RECIPE)
    bin_dir = work / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    shim = bin_dir / "qwen-quant"
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(REPO / 'cli.py'))} \"$@\"\n")
    shim.chmod(0o755)
    tok = work / "ci" / "qwen2-tokenizer"  # as if restored from the cache: the download is skipped
    shutil.copytree(tokenizer_dir(), tok)
    env = dict(os.environ, PYTHONPATH=str(REPO), QWEN_QUANT_TOKENIZER=str(tok))

    _run_steps(work, env)  # first run: no ci/baseline.json
    assert (work / "out" / "report.json").is_file() and (work / "out" / "baseline.json").is_file()
    shutil.copyfile(work / "out" / "baseline.json", work / "ci" / "baseline.json")  # the commit
    _run_steps(work, env)  # later runs gate against it
