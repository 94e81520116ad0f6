"""The llama.cpp backend (qwen_quant/backends/llamacpp.py) and its tokenizer check."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from gguf_helpers import TOKENIZER_DIR, eval_ids, f16_gguf, model_dir, read_vocab_tests  # noqa: E402

from qwen_quant.backends.llamacpp import LlamaCppBackend, check_tokenizer, tokenize_vocab_only  # noqa: E402
from qwen_quant.errors import QuantError  # noqa: E402

NAME = "qwen2-tiny-tied"


@pytest.fixture(scope="module")
def backend():
    with LlamaCppBackend(f16_gguf(NAME), device="cpu", n_ctx=64) as b:
        yield b


def test_backend_attributes(backend):
    assert backend.name == "llama.cpp" and backend.device == "cpu" and backend.dtype == "f16"
    assert backend.vocab_size == 151936
    v = backend.versions()
    assert v["llama_cpp_python"] and "CPU" in v["system_info"]


def test_rows_are_independent_and_ctx_grows(backend):
    """Each row starts from an empty KV cache; a longer sequence than n_ctx reopens with more room."""
    ids = eval_ids(2, 96)  # 96 > n_ctx 64
    both = backend.logits(ids)
    assert backend.n_ctx >= 96
    one = backend.logits(ids[1:2])
    np.testing.assert_allclose(both[1], one[0], atol=1e-4)
    first = backend.logits(ids[:1, :40])
    np.testing.assert_allclose(both[0, :40], first[0], atol=1e-4)


def test_greedy_matches_torch(backend):
    from qwen_quant.backends.torch_backend import TorchBackend

    prompt = eval_ids(2, 96)[0, :16].tolist()
    ref = TorchBackend(model_dir(NAME), device="cpu").greedy(prompt, 12)
    got = backend.greedy(prompt, 12)
    assert len(got) == 12
    assert got == ref
    # greedy continues exactly as teacher-forced argmax says
    lg = backend.logits(np.asarray([prompt + got[:-1]]))
    assert lg[0, len(prompt) - 1:].argmax(-1).tolist() == got


def test_tokenizer_vectors_llamacpp_and_hf():
    """Our GGUF's vocab in llama.cpp and the HF tokenizer both reproduce llama.cpp's qwen2 test vectors."""
    from transformers import AutoTokenizer

    tests = read_vocab_tests()
    texts = [t for t, _ in tests]
    got = tokenize_vocab_only(f16_gguf(NAME), texts)
    hf = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    for (text, want), ours in zip(tests, got):
        assert ours == want, f"llama.cpp on our GGUF: {text!r}"
        assert hf.encode(text, add_special_tokens=False) == want, f"HF tokenizer: {text!r}"
    # and llama.cpp's own reference vocab agrees with itself (sanity of the vector parsing)
    assert tokenize_vocab_only(TOKENIZER_DIR / "ggml-vocab-qwen2.gguf", texts[:5]) == [w for _, w in tests[:5]]


def test_check_tokenizer_catches_mismatch():
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    assert check_tokenizer(f16_gguf(NAME), hf, ["Hello world", "我想在apple工作"]) == 2

    class Shifted:
        def encode(self, text, add_special_tokens=False):
            return [i + 1 for i in hf.encode(text, add_special_tokens=add_special_tokens)]

    with pytest.raises(QuantError, match="does not match"):
        check_tokenizer(f16_gguf(NAME), Shifted(), ["Hello world"])


def test_missing_file_and_no_gpu_errors(tmp_path):
    with pytest.raises(QuantError, match="does not exist"):
        LlamaCppBackend(tmp_path / "nope.gguf")
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        with pytest.raises(QuantError, match="no GPU offload"):
            LlamaCppBackend(f16_gguf(NAME), device="cuda")


def test_llama_kwargs_override(backend):
    """Extra llama_cpp.Llama arguments go over ours: a smaller batch gives the same logits."""
    ids = eval_ids(1, 48)
    with LlamaCppBackend(f16_gguf(NAME), device="cpu", n_ctx=64, llama_kwargs={"n_batch": 16, "n_ubatch": 16}) as b:
        assert b._llm.n_batch == 16
        np.testing.assert_allclose(b.logits(ids), backend.logits(ids), atol=1e-3)


_GLOBAL_SYMBOL = "_ZNSo9_M_insertIlEERSoT_"  # std::ostream::_M_insert<long>, the call that crashed


@pytest.mark.parametrize("first", ["", "import torch; "])
def test_import_puts_libstdcxx_in_global_scope(first):
    """`import qwen_quant` makes libstdc++'s own symbols win global lookup before llama.cpp loads.

    A CUDA build's libggml-cuda.so exports weak copies of libstdc++ instances that crashed every model
    load on the GPU (qwen_quant/_native.py); with libstdc++ promoted first, dlsym(RTLD_DEFAULT) (the
    lookup order the dynamic linker uses for libllama) finds the real library's definition. Without the
    import, python itself does not link libstdc++, so the symbol is not global at all (the check can fail).
    """
    import subprocess
    import sys

    probe = ("import ctypes, ctypes.util; g = ctypes.CDLL(None); "
             f"a = ctypes.cast(getattr(g, '{_GLOBAL_SYMBOL}'), ctypes.c_void_p).value; "
             "s = ctypes.CDLL(ctypes.util.find_library('stdc++')); "
             f"print(a == ctypes.cast(getattr(s, '{_GLOBAL_SYMBOL}'), ctypes.c_void_p).value)")
    bare = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert bare.returncode != 0 and "undefined symbol" in bare.stderr
    ours = subprocess.run([sys.executable, "-c", f"{first}import qwen_quant, llama_cpp; {probe}"],
                          capture_output=True, text=True)
    assert ours.returncode == 0, ours.stderr[-500:]
    assert ours.stdout.strip() == "True"
