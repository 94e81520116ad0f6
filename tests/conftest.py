"""Shared test fixtures: trained tiny Qwen2 models (built once, cached under ~/.cache/qwen-quant) and a CLI runner."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _fixture(name: str) -> Path:
    from qwen_quant.progress import set_quiet
    from qwen_quant.fixtures import fixture_path

    set_quiet(True)
    return fixture_path(name)


@pytest.fixture(scope="session")
def tied_model() -> Path:
    """Like Qwen2-0.5B: tied embeddings, GQA 4:2, qkv bias, hidden 256."""
    return _fixture("qwen2-tiny-tied")


@pytest.fixture(scope="session")
def untied_model() -> Path:
    """Like Qwen1.5-7B: untied lm_head, MHA, qkv bias, hidden 128."""
    return _fixture("qwen2-tiny-untied")


@pytest.fixture(scope="session")
def model_72b() -> Path:
    """Like Qwen2-72B: GQA 8:1, intermediate 896 (7 groups of 128), vocab 152064."""
    return _fixture("qwen2-tiny-72b")


@pytest.fixture(scope="session")
def qwen3_model() -> Path:
    """Like Qwen3-0.6B: tied embeddings, GQA 4:2, no qkv bias, q/k RMSNorm, head_dim 64 != 128/4."""
    return _fixture("qwen3-tiny")


@pytest.fixture(scope="session")
def perturbed(untied_model, tmp_path_factory) -> Path:
    """A copy of the untied fixture with noise on one layer's MLP (every metric moves, predictably)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("perturbed")
    for f in untied_model.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    sd = load_file(str(out / "model.safetensors"))
    w = sd["model.layers.1.mlp.down_proj.weight"]
    sd["model.layers.1.mlp.down_proj.weight"] = w + torch.randn_like(w, generator=torch.Generator().manual_seed(0)) * w.std() * 2
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    from qwen_quant.calib import default_tokenizer_dir

    return Path(default_tokenizer_dir())


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """Run the real console-script entry point in-process; returns (exit code, stdout, stderr)."""
    import cli

    def run(*args: str):
        monkeypatch.setattr(sys, "argv", ["qwen-quant", *map(str, args)])
        with pytest.raises(SystemExit) as exc:
            cli.main()
        out = capsys.readouterr()
        code = exc.value.code
        return (0 if code is None else code), out.out, out.err

    return run
