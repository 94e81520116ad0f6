"""int4 ONNX that keeps a GPTQ/AWQ checkpoint's calibration: MatMulNBits holding the checkpoint's own codes.

`export onnx --int4` on a full-precision model re-quantizes with round-to-nearest, as onnxruntime-genai's
builder does by default. From a GPTQ (classic or compressed-tensors) or AWQ checkpoint we instead put the
checkpoint's own integer codes, per-group scales, zero points and (for act-order) ``g_idx`` into
``com.microsoft.MatMulNBits`` nodes, so onnxruntime computes exactly the weights GPTQ/AWQ chose and no
second quantization happens.

Why this is written here: onnxruntime's `MatMulNBitsQuantizer` (and its GPTQ/HQQ variants) always computes
codes itself from float weights; none accepts codes that were already computed. The node layout follows
onnxruntime's ContribOperators documentation for MatMulNBits: ``B`` uint8 [N, n_blocks, block_size/2]
(two 4-bit codes per byte along K, the lower nibble first), ``scales`` [N * n_blocks] in the activation
dtype, ``zero_points`` uint8 [N, ceil(n_blocks / 2)] packed the same way, ``g_idx`` int32 [K] (the
group of each input channel) when the groups are not the natural ``k // block_size``; the weight is
``scale * (code - zero_point)``.

The exported graph comes from the checkpoint dequantized into a dense model (`formats.load_dequantized`),
so every quantized linear's float weight is known bit for bit; each MatMul whose constant weight equals one
of them (matched by a hash of the exact bytes, since the exporter renames initializers) is replaced. The
embedding and lm_head, which GPTQ/AWQ checkpoints keep in full precision, stay float.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qwen_quant.errors import QuantError

METHODS = ("gptq", "awq", "compressed-tensors")


@dataclass
class LinearCodes:
    codes: np.ndarray  # [O, I] integer codes in [0, 2^bits)
    zeros: np.ndarray  # [O, G] integer zero points
    scales: np.ndarray  # [O, G] float32
    g_idx: np.ndarray | None  # [I] group of each input column; None: natural order (k // group_size)
    group_size: int

    def dequant(self) -> torch.Tensor:
        g = self.g_idx if self.g_idx is not None else np.arange(self.codes.shape[1]) // self.group_size
        return torch.from_numpy(self.scales[:, g] * (self.codes.astype(np.float32) - self.zeros[:, g]))


def quant_method(config: dict) -> str | None:
    return (config.get("quantization_config") or {}).get("quant_method")


def read_codes(model_dir: Path, config: dict) -> dict[str, LinearCodes]:
    """Every quantized linear of the checkpoint, by module name, as codes/zeros/scales/g_idx."""
    from qwen_quant.formats.checkpoint import WeightStore

    qc = config["quantization_config"]
    method = qc["quant_method"]
    bits = _bits(qc)
    if bits != 4:
        raise QuantError(f"{model_dir} holds {bits}-bit codes; ONNX MatMulNBits from a checkpoint takes 4-bit codes, "
                         "so export the full-precision source with --int8 or --int4 instead")
    store = WeightStore(model_dir)
    out: dict[str, LinearCodes] = {}
    suffix = ".weight_packed" if method == "compressed-tensors" else ".qweight"
    for name in store.where:
        if not name.endswith(suffix):
            continue
        base = name[: -len(suffix)]
        parts = {k: store.get(k) for k in store.names(base + ".")}
        out[base] = _unpack(method, parts, base, bits)
    if not out:
        raise QuantError(f"{model_dir}: quant_method {method!r} but no packed linear found; the checkpoint is damaged")
    return out


def _bits(qc: dict) -> int:
    if qc["quant_method"] != "compressed-tensors":
        return int(qc.get("bits", qc.get("w_bit", 4)))
    groups = list((qc.get("config_groups") or {}).values())
    return int(groups[0]["weights"]["num_bits"]) if groups else 4


def _unpack(method: str, parts: dict, base: str, bits: int) -> LinearCodes:
    if method == "gptq":
        from qwen_quant.formats.gptq import unpack

        codes, zeros, scales, g_idx = unpack(parts, base, bits)
        gs = codes.shape[1] // scales.shape[1]
        natural = np.array_equal(g_idx, np.arange(codes.shape[1]) // gs)
        return LinearCodes(codes, zeros, scales, None if natural else g_idx.astype(np.int32), gs)
    if method == "awq":
        from qwen_quant.formats.awq import unpack

        codes, zeros, scales = unpack(parts, base, bits)
        return LinearCodes(codes, zeros, scales, None, codes.shape[1] // scales.shape[1])
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    shape = tuple(int(s) for s in parts[f"{base}.weight_shape"].tolist())
    half = 2 ** (bits - 1)
    codes = (unpack_from_int32(parts[f"{base}.weight_packed"], bits, torch.Size(shape)).numpy().astype(np.int32) + half)
    scales = parts[f"{base}.weight_scale"].float().numpy()
    zp = parts.get(f"{base}.weight_zero_point")
    if zp is not None:
        zp = unpack_from_int32(zp, bits, torch.Size(scales.shape), packed_dim=0) if zp.dtype == torch.int32 else zp
        zeros = zp.numpy().astype(np.int32) + half
    else:
        zeros = np.full(scales.shape, half, np.int32)
    return LinearCodes(codes, zeros, scales, None, codes.shape[1] // scales.shape[1])


def _key(w_t: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(w_t).tobytes()).hexdigest()


def _pack_nibbles(a: np.ndarray) -> np.ndarray:
    """uint8 pairs along the last axis (padded to even length): lower nibble = even element."""
    a = a.astype(np.uint8)
    if a.shape[-1] % 2:
        a = np.concatenate([a, np.zeros((*a.shape[:-1], 1), np.uint8)], -1)
    return (a[..., 0::2] & 0xF) | ((a[..., 1::2] & 0xF) << 4)


def matmulnbits_tensors(lc: LinearCodes, dtype: np.dtype) -> dict[str, np.ndarray]:
    """B, scales, zero_points (and g_idx) of one linear in MatMulNBits' layout."""
    n, k = lc.codes.shape
    bs = lc.group_size
    if bs < 16 or bs & (bs - 1):
        raise QuantError(f"group size {bs} cannot be held by ONNX MatMulNBits (a power of two >= 16 is needed); "
                         "export the full-precision source with --int4 instead")
    n_blocks = -(-k // bs)
    codes = lc.codes
    if n_blocks * bs != k:
        codes = np.concatenate([codes, np.zeros((n, n_blocks * bs - k), codes.dtype)], 1)
    out = {
        "B": _pack_nibbles(codes.reshape(n, n_blocks, bs)),
        "scales": lc.scales.astype(dtype).reshape(-1),
        "zero_points": _pack_nibbles(lc.zeros.reshape(n, n_blocks)),
    }
    if lc.g_idx is not None:
        out["g_idx"] = lc.g_idx.astype(np.int32)
    return out


def replace_matmuls(proto, codes: dict[str, LinearCodes], dtype: np.dtype, accuracy_level: int | None = None) -> list[str]:
    """Swap each MatMul whose constant weight equals a checkpoint linear's dequantized weight for a
    MatMulNBits holding that linear's codes; returns the replaced linears' names (all of them, or an error)."""
    from onnx import helper, numpy_helper

    from qwen_quant.export.onnx_quant import drop_unused_initializers, fold_constant_transposes

    fold_constant_transposes(proto)
    drop_unused_initializers(proto)
    wanted = {}
    for name, lc in codes.items():
        w_t = lc.dequant().to(torch.float32).to(_torch_dtype(dtype)).T.numpy()
        wanted[_key(w_t)] = name
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    nodes, done, new_inits = [], [], []
    for node in graph.node:
        name = None
        if node.op_type == "MatMul" and node.input[1] in inits:
            arr = numpy_helper.to_array(inits[node.input[1]])
            if arr.ndim == 2 and arr.dtype == dtype:
                name = wanted.get(_key(arr))
        if name is None:
            nodes.append(node)
            continue
        lc = codes[name]
        t = matmulnbits_tensors(lc, dtype)
        stem = name.replace(".", "_")
        ins = [node.input[0]]
        for key in ("B", "scales", "zero_points", "g_idx"):
            if key in t:
                new_inits.append(numpy_helper.from_array(t[key], f"{stem}.{key}"))
                ins.append(f"{stem}.{key}")
        n, k = lc.codes.shape
        attrs = dict(K=k, N=n, bits=4, block_size=lc.group_size)
        if accuracy_level is not None:
            attrs["accuracy_level"] = accuracy_level
        nodes.append(helper.make_node("MatMulNBits", ins, list(node.output), name=f"{stem}_MatMulNBits",
                                      domain="com.microsoft", **attrs))
        done.append(name)
    missing = sorted(set(codes) - set(done))
    if missing:
        raise QuantError(f"ONNX export: {len(missing)} quantized linears of the checkpoint were not found in the graph "
                         f"(first: {missing[0]}); export the full-precision source instead and report the model")
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    drop_unused_initializers(proto)
    return done


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.float16 if np.dtype(dtype) == np.float16 else torch.float32


def source_of(model_dir: Path) -> str | None:
    """The full-precision model a qwen-quant checkpoint was made from (its report names it), if known."""
    for f in ("qwen-quant-quantize.json", "qwen-quant-report.json"):
        p = model_dir / f
        if not p.is_file():
            continue
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        src = d.get("source") or next((r.get("reference") for r in d.get("results", []) if r.get("reference")), None)
        if src and Path(src).is_dir():
            return str(src)
    return None
