"""The llama.cpp backend: a GGUF file scored through llama-cpp-python.

Teacher-forced logits come from one ``eval`` per row with ``logits_all=True`` after a state reset (the
KV cache is cut back to 0 tokens, so rows never see each other). Greedy decoding takes the argmax of
llama.cpp's own logits, one token at a time, from token ids we pass in: no text, no sampler, no
chat template, so every backend sees exactly the same ids. Layers go to the GPU when this
llama-cpp-python build supports offload (and ``device`` allows it), else everything runs on CPU.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from qwen_quant.backends.base import Backend
from qwen_quant.errors import QuantError


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise QuantError("the llama.cpp backend needs llama-cpp-python; pip install llama-cpp-python") from None
    return llama_cpp


def file_type_name(file_type: str | int | None) -> str:
    """'q4_k_m', 'f16', ... from a GGUF's general.file_type value."""
    import gguf

    try:
        ft = gguf.LlamaFileType(int(file_type))
    except (TypeError, ValueError):
        return "unknown"
    return ft.name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


class LlamaCppBackend(Backend):
    name = "llama.cpp"

    def __init__(self, path: str | Path, device: str = "auto", n_ctx: int = 512, n_threads: int | None = None,
                 llama_kwargs: dict | None = None):
        """``llama_kwargs``: extra ``llama_cpp.Llama`` arguments (e.g. ``split_mode``), applied over ours."""
        llama_cpp = _llama_cpp()
        self.path = Path(path)
        if not self.path.is_file():
            raise QuantError(f"{self.path} does not exist; pass a .gguf file")
        from qwen_quant.formats.integrity import check_gguf

        check_gguf(self.path)  # truncated or self-contradicting files: one line, exit 2
        gpu = bool(llama_cpp.llama_supports_gpu_offload())
        if device.startswith("cuda") and not gpu:
            raise QuantError(f"--device {device}: this llama-cpp-python build has no GPU offload; "
                             "use --device cpu or reinstall it with CMAKE_ARGS=-DGGML_CUDA=on")
        self.device = "cuda" if gpu and device != "cpu" else "cpu"
        self._n_threads = n_threads or max(1, min(8, os.cpu_count() or 1))
        self._extra = dict(llama_kwargs or {})
        self._llm = None
        self._open(n_ctx)
        self.dtype = file_type_name(self._llm.metadata.get("general.file_type"))
        self.vocab_size = int(self._llm.n_vocab())

    def _open(self, n_ctx: int) -> None:
        """(Re)load with a context of at least ``n_ctx``; logits_all keeps a [n_ctx, vocab] score buffer."""
        llama_cpp = _llama_cpp()
        if self._llm is not None:
            self._llm.close()
        kw = dict(n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_ubatch=min(n_ctx, 512), logits_all=True,
                  n_gpu_layers=-1 if self.device == "cuda" else 0, n_threads=self._n_threads,
                  op_offload=self.device == "cuda",  # --device cpu on a CUDA build: no batch ops sent to the GPU
                  n_threads_batch=self._n_threads, seed=0, verbose=False)
        self._llm = _load_llama(llama_cpp, self.path, **{**kw, **self._extra})
        self.n_ctx = n_ctx

    def _ensure_ctx(self, n: int) -> None:
        if n > self.n_ctx:
            self._open(-(-n // 256) * 256)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 2:
            raise QuantError(f"logits() takes token ids of shape [batch, seq], got {ids.shape}")
        self._ensure_ctx(ids.shape[1])
        out = np.empty((*ids.shape, self.vocab_size), dtype=np.float32)
        for b, row in enumerate(ids):
            self._llm.reset()
            self._llm.eval(row.tolist())
            out[b] = self._llm.scores[: len(row)]
        return out

    def greedy(self, prompt_ids: Sequence[int], n: int) -> list[int]:
        prompt = [int(t) for t in prompt_ids]
        self._ensure_ctx(len(prompt) + n)
        llm = self._llm
        llm.reset()
        llm.eval(prompt)
        out: list[int] = []
        for i in range(n):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(tok)
            if i + 1 < n:
                llm.eval([tok])
        return out

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's tokenizer, no BOS, special tokens not parsed (like llama.cpp's test-tokenizer-0)."""
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def versions(self) -> dict[str, str]:
        llama_cpp = _llama_cpp()
        return {
            "llama_cpp_python": llama_cpp.__version__,
            "gpu_offload": str(self.device == "cuda"),
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        }

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None


def _load_llama(llama_cpp, path: Path, **kw):
    """llama_cpp.Llama, with a load failure turned into one line naming the file and llama.cpp's reason."""
    with CapturedLog(llama_cpp) as log:
        try:
            return llama_cpp.Llama(model_path=str(path), **kw)
        except ValueError:
            why = (log.grep("error") or log.grep("failed") or ["no reason logged"])[-1]
    raise QuantError(f"{path}: llama.cpp cannot load it ({why}); the GGUF is damaged or inconsistent, re-export it")


class CapturedLog:
    """Route llama.cpp's log into a list (quiet, and the lines explain a failure), then restore it."""

    def __init__(self, llama_cpp):
        self.llama_cpp, self.lines = llama_cpp, []

        @llama_cpp.llama_log_callback
        def cb(level, text, _user):
            self.lines.append(text.decode("utf-8", errors="replace"))
        self._cb = cb  # keep the ctypes callback alive while C holds it

    def __enter__(self):
        self.llama_cpp.llama_log_set(self._cb, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc):
        from llama_cpp import _logger

        self.llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))

    def grep(self, word: str) -> list[str]:
        return [ln.strip() for ln in "".join(self.lines).splitlines() if word in ln]


def tokenize_vocab_only(path: str | Path, texts: Sequence[str], special: bool = False) -> list[list[int]]:
    """llama.cpp token ids for ``texts`` from a GGUF's vocabulary alone (no weights loaded), no BOS.

    ``special=False`` is llama.cpp's test-tokenizer-0 mode (``<|im_start|>`` is plain text);
    ``special=True`` matches control tokens written in the text, as HF tokenizers always do.

    The vocab load runs in a child process: a GGUF whose tokenizer metadata contradicts its token
    list makes llama.cpp throw a C++ exception inside the load (SIGABRT, a native backtrace), which
    would take this process down. The child's death becomes one line naming the file, exit 2.
    """
    import json
    import subprocess
    import sys

    _llama_cpp()  # the one-line "install llama-cpp-python" error, here rather than in the child
    job = json.dumps({"path": str(path), "texts": list(texts), "special": bool(special)})
    try:
        done = subprocess.run([sys.executable, "-m", "qwen_quant.backends.llamacpp"], input=job, capture_output=True,
                              text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise QuantError(f"{path}: llama.cpp's tokenizer did not load in 10 minutes; the GGUF's vocabulary is damaged, "
                         "re-export it") from None
    if done.returncode != 0 or not done.stdout.strip():
        why = "killed by signal " + str(-done.returncode) if done.returncode < 0 else f"exit {done.returncode}"
        lines = [ln.strip() for ln in done.stderr.splitlines() if ln.strip()]
        said = next((ln for ln in reversed(lines) if "what()" in ln or "error" in ln.lower()), lines[-1] if lines else "")
        raise QuantError(f"{path}: llama.cpp cannot load its tokenizer ({why}{': ' + said[:160] if said else ''}); the "
                         "GGUF's tokenizer metadata contradicts its token list, re-export it")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _vocab_child() -> int:
    """The child of `tokenize_vocab_only`: one JSON job on stdin, one JSON list of id lists on stdout."""
    import json
    import sys

    job = json.loads(sys.stdin.read())
    llama_cpp = _llama_cpp()
    with CapturedLog(llama_cpp) as log:
        try:
            llm = llama_cpp.Llama(model_path=job["path"], vocab_only=True, verbose=False)
        except ValueError:
            why = (log.grep("error") or log.grep("failed") or ["no reason logged"])[-1]
            print(f"error: {why}", file=sys.stderr)
            return 3
    try:
        ids = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=job["special"]) for t in job["texts"]]
    finally:
        llm.close()
    print(json.dumps(ids))
    return 0


def check_tokenizer(path: str | Path, hf_tokenizer, texts: Sequence[str]) -> int:
    """Raise QuantError unless llama.cpp (GGUF vocab) and the HF tokenizer give the same ids; returns #texts."""
    ours = tokenize_vocab_only(path, texts, special=True)
    for text, got in zip(texts, ours):
        want = hf_tokenizer.encode(text, add_special_tokens=False)
        if list(got) != list(want):
            raise QuantError(f"{path}: llama.cpp tokenizes {text[:40]!r} as {list(got)[:12]} but the HF tokenizer gives "
                             f"{list(want)[:12]}; the GGUF vocab does not match the model's tokenizer, re-export it")
    return len(texts)


if __name__ == "__main__":
    import sys

    sys.exit(_vocab_child())
