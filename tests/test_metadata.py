"""Metadata parity (qwen_quant/validate/metadata.py) on real artifacts of every type, and the g_idx convention."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from gate_helpers import TYPES, artifact, clean_report, reference, workdir
from qwen_quant.validate.metadata import failed_reasons, hf_numbers, metadata_parity

# what each runtime's view must cover (names of checks in Result.metadata)
COVERED = {"tokenizer ids", "<|im_start|> id", "<|im_end|> id", "eos_token_id", "chat template", "context_length"}
NUMBERS = {"rope_theta", "rms_eps", "rope_scaling"}


@pytest.mark.parametrize("kind", TYPES)
def test_clean_artifact_metadata_matches_the_source(kind):
    r = json.loads(clean_report(kind).read_text())["results"][0]
    md = r["metadata"]
    names = {c["name"] for c in md["checks"]}
    assert md["ok"] and not failed_reasons(md), md
    assert COVERED <= names, names
    assert NUMBERS <= names, names  # GGUF keys, the ONNX folder's config.json, config.json
    if kind == "gptq":
        conv = next(c for c in md["checks"] if c["name"] == "g_idx convention")
        assert "Marlin" in conv["expected"] and conv["ok"]


def test_pretokenizer_fault_counts_paragraphs():
    """A GGUF with another pre-tokenizer: llama.cpp splits many eval paragraphs differently."""
    from qwen_quant.faults.plant import plant

    src = artifact("gguf")
    f = plant(src, "pretokenizer", workdir() / "md-pre" / src.name, seed=3)
    md = metadata_parity(f.path, reference())
    tok = next(c for c in md["checks"] if c["name"] == "tokenizer ids")
    assert not md["ok"] and not tok["ok"] and int(tok["actual"].split()[0]) >= 5, tok
    assert src.name in tok["reason"] and "\n" not in tok["reason"]


def test_desc_act_false_with_reordered_g_idx_is_flagged():
    """Marlin/ExLlama ignore g_idx without desc_act: a reordered g_idx would validate one model and serve another."""
    from safetensors.numpy import load_file, save_file

    from qwen_quant.formats.integrity import gidx_convention

    src = artifact("gptq")
    out = workdir() / "gidx" / src.name
    shutil.copytree(src, out, dirs_exist_ok=True)
    f = next(out.glob("*.safetensors"))
    sd = load_file(str(f))
    name = sorted(k for k in sd if k.endswith(".g_idx"))[0]
    sd[name] = np.ascontiguousarray(np.random.default_rng(0).permutation(sd[name]))
    save_file(sd, str(f))
    cfg = json.loads((out / "config.json").read_text())
    conv = gidx_convention(out, cfg)
    assert not conv["ok"] and name in conv["reason"] and "Marlin" in conv["reason"]
    cfg["quantization_config"]["desc_act"] = True
    assert gidx_convention(out, cfg)["ok"]  # act-order: every kernel applies g_idx, as our dequantizer does


def test_hf_numbers_reads_both_config_spellings():
    old = {"max_position_embeddings": 4096, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
           "rope_scaling": {"type": "yarn", "factor": 4.0}}
    new = {"max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
           "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}
    assert hf_numbers(old) == hf_numbers(new) == {"context_length": 4096, "rope_theta": 1e6,
                                                  "rope_scaling": ("yarn", 4.0), "rms_eps": 1e-6}
    assert hf_numbers({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})["rope_scaling"] == ("none", 1.0)
