"""Process-wide native-library setup that has to happen before torch or llama.cpp load (stdlib only).

``promote_libstdcxx`` puts the C++ runtime into the process's global symbol scope. llama-cpp-python
loads ``libggml`` with RTLD_GLOBAL before ``libllama``, so libggml's dependencies (libggml-cpu,
libggml-cuda, ...) join the global scope ahead of libstdc++. A CUDA build made with nvcc 13 exports
weak copies of libstdc++ template instances from libggml-cuda.so, and libllama's calls such as
``std::ostream::operator<<(long)`` then bind to those copies, which call the wrong virtual slot:
every model load segfaulted, offloaded or not (measured on an H100: SIGSEGV at 0x20 in
``codecvt::do_unshift`` called from ``ostream::_M_insert<long>`` in libggml-cuda.so, under
``llama_model_load_from_file``). With libstdc++ global first, every such reference binds to the real
library, as ``LD_PRELOAD=libstdc++.so.6`` does (both measured to load and run there, also when torch
with its CUDA libraries was imported first). ``import qwen_quant`` runs it, which every import of one of
our modules (the llama.cpp backend, the GGUF quantizer) goes through first; harmless for CPU builds.
"""

from __future__ import annotations

import sys


def promote_libstdcxx() -> None:
    """Load libstdc++ with RTLD_GLOBAL (a no-op off Linux or where it cannot be found)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("stdc++") or "libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        pass
