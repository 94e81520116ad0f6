"""Shared pieces of the GGUF / llama.cpp tests: trained fixtures, a cached F16 GGUF, torch references, KL.

The F16 GGUF of a fixture is cached next to the fixture (keyed by the writer's source), because
writing the 152k-token vocabulary takes ~10 s on 2 cores and three test modules need it.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from qwen_quant.fixtures import tokenizer_dir

TOKENIZER_DIR = tokenizer_dir()  # $QWEN_QUANT_TOKENIZER, else ../shared/fixtures/qwen2-tokenizer


@lru_cache(maxsize=None)
def model_dir(name: str) -> Path:
    from qwen_quant.fixtures import fixture_path

    return fixture_path(name, quiet=True)


@lru_cache(maxsize=None)
def f16_gguf(name: str) -> Path:
    import qwen_quant.export.gguf as writer

    src = model_dir(name)
    key = hashlib.sha256(Path(writer.__file__).read_bytes()).hexdigest()[:10]
    out = src.parent / "gguf" / f"{src.name}-f16-{key}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        writer.write_float_gguf(src, out, "f16")
    return out


@lru_cache(maxsize=None)
def eval_ids(rows: int = 2, seq: int = 96) -> np.ndarray:
    """Held-out real text (the shipped eval set) as [rows, seq] ids: trained fixtures give real logits on it."""
    from transformers import AutoTokenizer

    from qwen_quant.calib import eval_tokens

    toks = eval_tokens(AutoTokenizer.from_pretrained(TOKENIZER_DIR), max_tokens=rows * seq)
    return np.asarray(toks, dtype=np.int64).reshape(rows, seq)


@lru_cache(maxsize=None)
def torch_logits(name: str, rows: int = 2, seq: int = 96) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir(name), dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(input_ids=torch.as_tensor(eval_ids(rows, seq))).logits.float().numpy()


def gguf_logits(path: Path, rows: int = 2, seq: int = 96) -> np.ndarray:
    from qwen_quant.backends.llamacpp import LlamaCppBackend

    with LlamaCppBackend(path, device="cpu", n_ctx=128) as b:
        return b.logits(eval_ids(rows, seq))


def mean_kl(ref: np.ndarray, test: np.ndarray) -> float:
    """Mean over positions of KL(ref || test), in nats."""
    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(test)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def read_vocab_tests() -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test vectors (test-tokenizer-0 format) for the Qwen2 vocab."""
    inp = (TOKENIZER_DIR / "ggml-vocab-qwen2.gguf.inp").read_text(encoding="utf-8")
    out = (TOKENIZER_DIR / "ggml-vocab-qwen2.gguf.out").read_text(encoding="utf-8").split("\n")
    texts = inp.split("\n__ggml_vocab_test__\n")
    if texts and texts[-1] == "":
        texts.pop()
    ids = [[int(t) for t in line.split()] for line in out[: len(texts)]]
    assert len(texts) == len(ids)
    return list(zip(texts, ids))
