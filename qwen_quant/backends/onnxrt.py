"""The onnxruntime backend: runs a folder written by `qwen-quant export onnx` (or any optimum-style
decoder with ``past_key_values.N.key/value`` inputs and ``present.N.key/value`` outputs).

Teacher-forced logits go through the KV cache in chunks, so memory for attention stays bounded on
long contexts and the same code path that greedy decoding uses is the one being scored. The CPU
execution provider is the default; CUDA is used when onnxruntime-gpu is installed and asked for
(or ``device="auto"`` finds it).

Every step runs through onnxruntime's IO binding: inputs are placed on the session's device, the KV
cache stays there between steps as OrtValues, and the logits come back as a torch tensor on that
device through DLPack (``device_logits``), so on the CUDA EP the metrics run on the GPU and the
[batch, seq, vocab] block is never copied to the host. The same path runs on the CPU EP, where the
tests check it against plain ``session.run``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from qwen_quant.backends.base import Backend
from qwen_quant.devices import ort_providers
from qwen_quant.errors import QuantError

_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")
_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": np.float32}


def model_file(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "model.onnx"
    if not p.exists() or p.suffix != ".onnx":
        raise QuantError(f"{path} is not an ONNX model (expected a .onnx file or a folder with model.onnx); "
                         "export one with qwen-quant export onnx")
    return p


def position_ids(mask: np.ndarray) -> np.ndarray:
    """Positions that skip left padding: the first real token is position 0 (as HF generate does)."""
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)


class OrtBackend(Backend):
    name = "onnxruntime"

    def __init__(self, path: str | Path, device: str = "auto", chunk: int = 256, threads: int | None = None):
        import onnxruntime as ort

        from qwen_quant.formats.integrity import check_onnx

        self.path = model_file(path)
        check_onnx(self.path)  # truncated model or external data, genai_config contradicting the graph: exit 2
        self.device, providers = ort_providers(device)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph/... types, no common base
            first = (str(err).splitlines() or [""])[0][:200]
            raise QuantError(f"{self.path}: onnxruntime cannot load it ({first}); the model is damaged, re-export it") from None
        self.chunk = max(1, int(chunk))
        self._inputs = {i.name: i for i in self.session.get_inputs()}
        missing = {"input_ids", "attention_mask"} - set(self._inputs)
        layers = sorted({int(m.group(1)) for n in self._inputs if (m := _PAST.match(n))})
        if missing or not layers:
            raise QuantError(f"{self.path} lacks the KV-cache decoder inputs (input_ids, attention_mask, "
                             "past_key_values.N.key/value); export it with qwen-quant export onnx")
        self.n_layers = len(layers)
        past = self._inputs["past_key_values.0.key"]
        self._kv_heads, self._head_dim = past.shape[1], past.shape[3]
        self._kv_dtype = _NP.get(past.type, np.float32)
        self._outputs = [o.name for o in self.session.get_outputs()]
        vocab = self.session.get_outputs()[0].shape[-1]
        self.vocab_size = int(vocab) if isinstance(vocab, int) else 0
        self.dtype = self._describe_dtype()
        self._ort_device = "cuda" if self.device.startswith("cuda") else "cpu"
        self._device_id = int(self.device.split(":")[1]) if ":" in self.device else 0

    def _describe_dtype(self) -> str:
        meta = self.path.parent / "qwen_quant_export.json"
        base = "float16" if self._kv_dtype == np.float16 else "float32"
        if meta.exists():
            exp = json.loads(meta.read_text()).get("export", {})
            if exp.get("int4"):
                return f"int4-b{exp.get('block_size')}-{'sym' if exp.get('symmetric') else 'asym'}({base})"
            if exp.get("int8"):
                return f"int8-dynamic({base})"
        return base

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        z = np.zeros((batch, self._kv_heads, 0, self._head_dim), dtype=self._kv_dtype)
        return {f"past_key_values.{i}.{kv}": z for i in range(self.n_layers) for kv in ("key", "value")}

    def _value(self, arr: np.ndarray):
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr), self._ort_device, self._device_id)

    def _bound_step(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list | None):
        """One step through IO binding: ``(logits as a torch tensor on the session's device, presents)``.

        ``past``: the previous step's present OrtValues (on the device), or None for an empty cache.
        """
        import torch

        io = self.session.io_binding()
        feed = {"input_ids": ids, "attention_mask": mask}
        if "position_ids" in self._inputs:
            feed["position_ids"] = pos
        for name, arr in feed.items():
            io.bind_ortvalue_input(name, self._value(arr))
        if past is None:
            z = self._value(np.zeros((ids.shape[0], self._kv_heads, 0, self._head_dim), dtype=self._kv_dtype))
            past = [z] * (2 * self.n_layers)
        names = [f"past_key_values.{i}.{kv}" for i in range(self.n_layers) for kv in ("key", "value")]
        for name, v in zip(names, past):
            io.bind_ortvalue_input(name, v)
        for name in self._outputs:
            io.bind_output(name, self._ort_device, self._device_id)
        self.session.run_with_iobinding(io)
        outs = dict(zip(self._outputs, io.get_outputs()))
        presents = [outs[n.replace("past_key_values.", "present.", 1)] for n in names]
        return torch.from_dlpack(outs[self._outputs[0]]), presents

    def device_logits(self, ids: np.ndarray, keep: int | None = None, attention_mask: np.ndarray | None = None):
        """Teacher-forced logits as a torch tensor on the session's device (no host copy on the CUDA EP).

        ``keep``: only the last ``keep`` positions are returned (chunks before them are run for the
        cache only, and their logits are dropped on the device).
        """
        import torch

        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64))
        if ids.ndim != 2:
            raise QuantError(f"token ids must be [batch, seq], got shape {ids.shape}")
        b, t = ids.shape
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        pos = position_ids(mask)
        first = 0 if keep is None else max(0, t - keep)
        past, parts = None, []
        for s in range(0, t, self.chunk):
            e = min(t, s + self.chunk)
            lg, past = self._bound_step(ids[:, s:e], mask[:, :e], pos[:, s:e], past)
            if e > first:
                parts.append(lg[:, max(first - s, 0):].clone())  # own memory: the session may reuse its buffers
        return torch.cat(parts, dim=1)

    def _step(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: dict) -> tuple[np.ndarray, dict]:
        feed = {"input_ids": ids, "attention_mask": mask, **past}
        if "position_ids" in self._inputs:
            feed["position_ids"] = pos
        outs = self.session.run(self._outputs, feed)
        presents = {n.replace("present.", "past_key_values.", 1): v for n, v in zip(self._outputs[1:], outs[1:])
                    if n.startswith("present.")}
        return outs[0], presents

    def logits(self, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Teacher-forced logits; ``attention_mask`` (1 = token, 0 = left padding) allows padded batches."""
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64))
        if ids.ndim != 2:
            raise QuantError(f"token ids must be [batch, seq], got shape {ids.shape}")
        b, t = ids.shape
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        pos = position_ids(mask)
        past = self._empty_past(b)
        out = None
        for s in range(0, t, self.chunk):
            e = min(t, s + self.chunk)
            lg, past = self._step(ids[:, s:e], np.ascontiguousarray(mask[:, :e]), np.ascontiguousarray(pos[:, s:e]), past)
            if out is None:
                out = np.empty((b, t, lg.shape[-1]), dtype=np.float32)
            out[:, s:e] = lg
        return out

    def greedy(self, prompt_ids: Sequence[int], n: int) -> list[int]:
        """Greedy decoding with the KV cache kept on the session's device; only the argmax leaves it."""
        ids = np.asarray([list(prompt_ids)], dtype=np.int64)
        t = ids.shape[1]
        if t == 0:
            raise QuantError("greedy decoding needs a prompt of at least one token")
        past = None
        result: list[int] = []
        # Prefill in chunks too, so long prompts cost the same memory as scoring.
        for s in range(0, t, self.chunk):
            e = min(t, s + self.chunk)
            lg, past = self._bound_step(ids[:, s:e], np.ones((1, e), np.int64), np.arange(s, e, dtype=np.int64)[None], past)
        for _ in range(n):
            nxt = int(lg[0, -1].float().argmax())
            result.append(nxt)
            if len(result) == n:
                break
            lg, past = self._bound_step(np.array([[nxt]], np.int64), np.ones((1, t + 1), np.int64),
                                        np.array([[t]], np.int64), past)
            t += 1
        return result

    def versions(self) -> dict[str, str]:
        import onnxruntime as ort

        return {"onnxruntime": ort.__version__, "providers": ",".join(self.session.get_providers())}

    def close(self) -> None:
        self.session = None
