"""Every artifact the demo makes (GPTQ, AWQ, GGUF q8_0/q4_k_m, ONNX int4 of the tied fixture) is
byte-identical to the hashes recorded before the quantizer/format/pipeline restructuring.

Rebuild the record with `python scripts/artifact_hashes.py OUTDIR --json tests/data/artifact_hashes.json`
only when a change is meant to alter the bytes (and say so in the commit)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

RECORDED = json.loads((ROOT / "tests" / "data" / "artifact_hashes.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("part", ["gptq", "awq", "gguf", "onnx"])
def test_artifact_bytes_unchanged(part, tmp_path):
    from artifact_hashes import build_all

    assert build_all(tmp_path, parts=(part,))[part] == RECORDED[part]


def test_hash_record_covers_weights():
    """The record is not empty and names the weight files (a guard against recording nothing)."""
    assert {"model.safetensors", "config.json"} <= set(RECORDED["gptq"]) & set(RECORDED["awq"])
    assert set(RECORDED["gguf"]) == {"q8_0.gguf", "q4_k_m.gguf"}
    assert "model.onnx" in RECORDED["onnx"]
