"""Quantized GGUF types through llama.cpp's own quantizer (``llama_model_quantize`` via llama-cpp-python).

We never re-implement k-quants: the mixes (which tensor gets Q6_K in a Q4_K_M file, fallbacks for rows
that are not a multiple of 256) are llama.cpp's, so our files are what ``llama-quantize`` would write.
Tiny models (hidden 128) hit that fallback: llama.cpp quantizes such tensors with a legacy type
(q4_0/q5_0/q5_1/q8_0 by target) and logs it; the file still loads and is valid.

The importance matrix travels as llama.h's ``llama_model_imatrix_data`` array (name, float*, size,
terminated by a NULL name). llama.cpp replaced the old ``std::unordered_map`` pointer with that plain C
struct, so ctypes can build it; older llama-cpp-python builds that still take the C++ map are refused
with a clear message instead of being fed a pointer of the wrong type.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Mapping

import gguf
import numpy as np

from qwen_quant.backends.llamacpp import CapturedLog
from qwen_quant.errors import QuantError

#: type name (CLI) -> llama_ftype. Values come from gguf-py's LlamaFileType (== llama.h's enum).
QUANT_TYPES: dict[str, gguf.LlamaFileType] = {
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K,
    "q5_k_m": gguf.LlamaFileType.MOSTLY_Q5_K_M,
    "q5_k_s": gguf.LlamaFileType.MOSTLY_Q5_K_S,
    "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
    "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
    "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    "q4_k_s": gguf.LlamaFileType.MOSTLY_Q4_K_S,
    "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "q3_k_l": gguf.LlamaFileType.MOSTLY_Q3_K_L,
    "q3_k_m": gguf.LlamaFileType.MOSTLY_Q3_K_M,
    "q3_k_s": gguf.LlamaFileType.MOSTLY_Q3_K_S,
    "q2_k": gguf.LlamaFileType.MOSTLY_Q2_K,
}

#: Float types are written directly by our writer (no llama.cpp pass).
FLOAT_TYPES = ("f32", "f16", "bf16")


def parse_types(spec: str | list[str]) -> list[str]:
    """'q4_k_m,Q8_0' -> ['q4_k_m', 'q8_0']; an unknown name lists the supported ones."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for raw in names:
        name = raw.strip().lower()
        if not name:
            continue
        if name not in QUANT_TYPES and name not in FLOAT_TYPES:
            raise QuantError(f"unknown GGUF type {raw.strip()!r}; supported: {', '.join([*QUANT_TYPES, *FLOAT_TYPES])}")
        if name not in out:
            out.append(name)
    if not out:
        raise QuantError("no GGUF type given; pass e.g. --type q4_k_m,q8_0")
    return out


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise QuantError("quantized GGUF needs llama-cpp-python; pip install llama-cpp-python") from None
    return llama_cpp


def _imatrix_array(llama_cpp, imatrix: Mapping[str, np.ndarray]):
    """A NULL-terminated ``llama_model_imatrix_data[]``; returns (array, keep-alive buffers)."""
    entry = getattr(llama_cpp, "llama_model_imatrix_data", None)
    field = dict(llama_cpp.llama_model_quantize_params._fields_).get("imatrix")
    if entry is None or field is not ctypes.POINTER(entry):
        raise QuantError(f"llama-cpp-python {llama_cpp.__version__} takes the importance matrix as a C++ map, "
                         "which cannot be built from Python; upgrade llama-cpp-python to >= 0.3.36")
    arr = (entry * (len(imatrix) + 1))()
    keep = []
    for i, (name, values) in enumerate(sorted(imatrix.items())):
        buf = np.ascontiguousarray(values, dtype=np.float32)
        if not np.all(np.isfinite(buf)):
            raise QuantError(f"importance matrix for {name} has non-finite values; recompute it on clean calibration text")
        nm = name.encode()
        keep += [buf, nm]
        arr[i].name, arr[i].data, arr[i].size = nm, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), buf.size
    arr[len(imatrix)].name = None
    return arr, keep


def quantize_gguf(src: Path, out: Path, qtype: str, imatrix: Mapping[str, np.ndarray] | None = None,
                  nthread: int = 0) -> Path:
    """llama.cpp-quantize the float GGUF ``src`` to ``qtype`` at ``out`` (temp file + rename).

    ``imatrix`` maps GGUF tensor names (``blk.0.attn_q.weight``) to per-input-column mean x^2,
    the values llama-quantize reads from an imatrix file.
    """
    if qtype not in QUANT_TYPES:
        raise QuantError(f"unknown GGUF quant type {qtype!r}; supported: {', '.join(QUANT_TYPES)}")
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(QUANT_TYPES[qtype])
    params.nthread = nthread
    keep = None
    if imatrix:
        arr, keep = _imatrix_array(llama_cpp, imatrix)
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        with CapturedLog(llama_cpp) as log:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 or not tmp.is_file():
            why = (log.grep("error") or log.grep("failed") or ["no message"])[-1]
            raise QuantError(f"llama.cpp failed to quantize {src} to {qtype} ({why}); "
                             "check free disk space and that the source GGUF loads")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    del keep
    return out


def tensor_types(path: Path) -> dict[str, str]:
    """GGUF tensor name -> GGML type name, e.g. to show which tensors fell back from a k-quant."""
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
