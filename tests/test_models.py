"""Registry, loader and the one-line errors of bad inputs (exit code 2)."""

from __future__ import annotations

import json

import pytest

from qwen_quant.errors import QuantError
from qwen_quant.models import detect_family, model_info, resolve_model


def test_registry_knows_qwen2_quirks(tied_model, untied_model, model_72b):
    infos = {p.name.rsplit("-", 1)[0]: model_info(json.loads((p / "config.json").read_text()), p)
             for p in (tied_model, untied_model, model_72b)}
    t, u, b = infos["qwen2-tiny-tied"], infos["qwen2-tiny-untied"], infos["qwen2-tiny-72b"]
    assert t.tied_embeddings and not u.tied_embeddings and not b.tied_embeddings
    assert t.gqa and not u.gqa and (b.num_heads, b.num_kv_heads) == (8, 1)
    assert all(i.qkv_bias and i.family == "qwen2" for i in (t, u, b))
    assert b.intermediate_size % 1024 and b.vocab_size == 152064
    assert t.rope_theta == 1e6


def test_v1_is_refused_with_the_convert_command(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen", "architectures": ["QWenLMHeadModel"]}))
    with pytest.raises(QuantError, match="qwen-quant convert"):
        detect_family(json.loads((tmp_path / "config.json").read_text()), tmp_path)


def test_hub_id_not_cached_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(QuantError, match="not in the local Hugging Face cache"):
        resolve_model("Qwen/Qwen2-1.5B")


def _bad_inputs(tmp_path, model):
    empty = tmp_path / "empty"
    empty.mkdir()
    v1 = tmp_path / "v1"
    v1.mkdir()
    (v1 / "config.json").write_text(json.dumps({"model_type": "qwen", "architectures": ["QWenLMHeadModel"]}))
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    blank = tmp_path / "blank.txt"
    blank.write_text("")
    return {
        "missing folder": (["eval", tmp_path / "nope"], "does not exist"),
        "no config.json": (["eval", empty], "no config.json"),
        "qwen v1": (["eval", v1], "qwen-quant convert"),
        "unknown type": (["info", llama], "unknown model type 'llama'"),
        "missing data": (["eval", model, "--data", tmp_path / "nope.txt"], "does not exist"),
        "empty data": (["eval", model, "--data", blank], "empty"),
        "ctx too large": (["eval", model, "--ctx", "100000"], "larger than the model's context"),
    }


def test_bad_inputs_give_one_line_and_exit_2(tmp_path, untied_model, run_cli):
    for case, (args, needle) in _bad_inputs(tmp_path, untied_model).items():
        code, out, err = run_cli(*args, "-q") if args[0] == "eval" else run_cli(*args)
        lines = [line for line in err.strip().splitlines() if line]
        assert code == 2, (case, code, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (case, err)
        assert needle in lines[0], (case, lines[0])


def test_info_prints_quirks(untied_model, run_cli):
    code, out, _ = run_cli("info", untied_model, "--json")
    assert code == 0
    d = json.loads(out)
    assert d["family"] == "qwen2" and "untied lm_head" in d["quirks"] and d["num_layers"] == 2
