"""Commands print only our own output: no other library's warnings, info logs or progress bars."""

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOREIGN = re.compile(r"Warning\b|Loading weights|Skipping|it/s\]|\[transformers\]|deprecated|opset", re.I)


def _run(*args: str, cwd: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="200")
    env.pop("PYTHONWARNINGS", None)
    r = subprocess.run([sys.executable, str(REPO / "cli.py"), *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout + r.stderr


def _foreign(text: str) -> list[str]:
    return [line for line in text.splitlines() if FOREIGN.search(line)]


@pytest.fixture(scope="module")
def tiny():
    from qwen_quant.fixtures import fixture_path

    return fixture_path("qwen2-tiny-tied")


def test_eval_prints_no_foreign_warnings_or_bars(tiny, tmp_path):
    """eval loads two models through transformers and decodes with a cache: the bars and the
    past_key_values FutureWarning came from here."""
    out = _run("eval", str(tiny), "--reference", str(tiny), "--max-tokens", "128", "--ctx", "32",
               "--greedy-tokens", "2", cwd=tmp_path)
    assert "PPL" in out  # our own table is still there
    assert _foreign(out) == []


def test_torch_onnx_skipping_notes_are_filtered():
    """The exporter's "torchvision is not installed. Skipping ..." lines: dropped even after torch resets levels."""
    from qwen_quant.quiet import silence_foreign

    silence_foreign()
    import torch.onnx  # noqa: F401  (torch configures its loggers on import)

    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    log.addHandler(handler)
    try:
        log.setLevel(logging.WARNING)
        log.warning("torchvision is not installed. Skipping torchvision::nms")
        log.error("a real export failure")
    finally:
        log.removeHandler(handler)
    assert [r.getMessage() for r in seen] == ["a real export failure"]


@pytest.mark.slow
def test_export_onnx_prints_no_foreign_warnings(tiny, tmp_path):
    out = _run("export", "onnx", str(tiny), "-o", str(tmp_path / "onnx"), "--no-validate", cwd=tmp_path)
    assert _foreign(out) == []
