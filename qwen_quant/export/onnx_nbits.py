"""int4 ONNX that keeps a GPTQ/AWQ checkpoint's calibration: MatMulNBits holding the checkpoint's own codes.

`export onnx --int4` on a full-precision model re-quantizes with round-to-nearest, as onnxruntime-genai's
builder does by default. From a GPTQ (classic or compressed-tensors) or AWQ checkpoint we instead put the
checkpoint's own integer codes, per-group scales and zero points into ``com.microsoft.MatMulNBits``
nodes, so onnxruntime computes exactly the weights GPTQ/AWQ chose and no second quantization happens.

Why this is written here: onnxruntime's `MatMulNBitsQuantizer` (and its GPTQ/HQQ variants) always computes
codes itself from float weights; none accepts codes that were already computed. The node layout follows
onnxruntime's ContribOperators documentation for MatMulNBits: ``B`` uint8 [N, n_blocks, block_size/2]
(two 4-bit codes per byte along K, the lower nibble first), ``scales`` [N * n_blocks] in the activation
dtype, ``zero_points`` uint8 [N, ceil(n_blocks / 2)] packed the same way; the weight is
``scale * (code - zero_point)``.

Act-order (``desc_act``) checkpoints assign input channels to groups out of order. Rather than passing
``g_idx`` (which not every execution provider's MatMulNBits kernel takes), the input channels are sorted by
group: a ``Gather`` along the last axis permutes the activation (shared by linears that read the same input
with the same order, as q/k/v do) and the codes are stored in that order, so every group is contiguous and
the kernels' fast paths apply; ``x[..., p] @ W[:, p]^T == x @ W^T`` exactly.

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
    from qwen_quant.formats.fp8 import is_fp8

    from qwen_quant.formats.checkpoint import WeightStore

    qc = config["quantization_config"]
    method = qc["quant_method"]
    if is_fp8(qc):
        raise QuantError(f"{model_dir} is an FP8 checkpoint; ONNX MatMulNBits takes 4-bit GPTQ/AWQ codes, "
                         "so export the full-precision source (optionally with --int4 or --int8) instead")
    if method not in METHODS:
        raise QuantError(f"{model_dir}: quant_method {method!r} has no ONNX route; export takes GPTQ, AWQ or "
                         "compressed-tensors int4 checkpoints, or export the full-precision source")
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
        try:
            parts = {k: store.get(k) for k in store.names(base + ".")}
            out[base] = _unpack(method, parts, base, bits)
        except (KeyError, ValueError, RuntimeError, OSError) as err:
            first = (str(err).splitlines() or [""])[0][:160]
            raise QuantError(f"{model_dir}: linear {base} cannot be unpacked ({type(err).__name__}: {first}); "
                             "the checkpoint is damaged, re-create it") from None
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

    if f"{base}.weight_shape" not in parts or f"{base}.weight_scale" not in parts:
        raise QuantError(f"{base}: weight_packed without weight_shape/weight_scale; the checkpoint is damaged, re-create it")

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
    gs = codes.shape[1] // scales.shape[1]
    g_idx = parts.get(f"{base}.weight_g_idx")
    if g_idx is not None and not np.array_equal(g_idx.numpy(), np.arange(codes.shape[1]) // gs):
        return LinearCodes(codes, zeros, scales, g_idx.numpy().astype(np.int32), gs)
    return LinearCodes(codes, zeros, scales, None, gs)


def check_codes(codes: dict[str, LinearCodes]) -> None:
    """Every linear fits MatMulNBits (raises the one-line error before any export work is done)."""
    for lc in codes.values():
        _check_block(lc.group_size)


def _check_block(bs: int) -> None:
    if bs < 16 or bs & (bs - 1):
        raise QuantError(f"group size {bs} cannot be held by ONNX MatMulNBits (a power of two >= 16 is needed); "
                         "export the full-precision source with --int4 instead")


def sort_groups(lc: LinearCodes) -> tuple[LinearCodes, np.ndarray | None]:
    """The linear with input channels sorted by group (contiguous groups) and the permutation used;
    (lc, None) when the groups already are in natural order."""
    if lc.g_idx is None:
        return lc, None
    k = lc.codes.shape[1]
    perm = np.argsort(lc.g_idx, kind="stable")
    if not np.array_equal(lc.g_idx[perm], np.arange(k) // lc.group_size):
        raise QuantError("the checkpoint's g_idx gives groups of unequal size; ONNX MatMulNBits cannot hold it, "
                         "export the full-precision source with --int4 instead")
    return LinearCodes(lc.codes[:, perm], lc.zeros, lc.scales, None, lc.group_size), perm.astype(np.int64)


def _key(w_t: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(w_t).tobytes()).hexdigest()


def _pack_nibbles(a: np.ndarray) -> np.ndarray:
    """uint8 pairs along the last axis (padded to even length): lower nibble = even element."""
    a = a.astype(np.uint8)
    if a.shape[-1] % 2:
        a = np.concatenate([a, np.zeros((*a.shape[:-1], 1), np.uint8)], -1)
    return (a[..., 0::2] & 0xF) | ((a[..., 1::2] & 0xF) << 4)


def matmulnbits_tensors(lc: LinearCodes, dtype: np.dtype) -> dict[str, np.ndarray]:
    """B, scales and zero_points of one linear in MatMulNBits' layout."""
    n, k = lc.codes.shape
    bs = lc.group_size
    _check_block(bs)
    if lc.g_idx is not None:
        raise ValueError("sort_groups() first: MatMulNBits tensors are written for contiguous groups")
    n_blocks = -(-k // bs)
    codes = lc.codes
    if n_blocks * bs != k:
        codes = np.concatenate([codes, np.zeros((n, n_blocks * bs - k), codes.dtype)], 1)
    out = {
        "B": _pack_nibbles(codes.reshape(n, n_blocks, bs)),
        "scales": lc.scales.astype(dtype).reshape(-1),
        "zero_points": _pack_nibbles(lc.zeros.reshape(n, n_blocks)),
    }
    return out


def replace_matmuls(proto, codes: dict[str, LinearCodes], dtype: np.dtype, accuracy_level: int | None = None) -> list[str]:
    """Swap each MatMul whose constant weight equals a checkpoint linear's dequantized weight for a
    MatMulNBits holding that linear's codes; returns the replaced linears' names (all of them, or an error)."""
    from onnx import helper, numpy_helper

    from qwen_quant.export.onnx_quant import drop_unused_initializers

    check_codes(codes)
    wanted: dict[str, list[str]] = {}
    for name, lc in codes.items():
        w_t = lc.dequant().to(_torch_dtype(dtype)).T.numpy()
        wanted.setdefault(_key(w_t), []).append(name)
    _fold_wanted_transposes(proto, wanted)
    drop_unused_initializers(proto)
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    nodes, done, new_inits = [], [], []
    gathers: dict[tuple[str, str], str] = {}  # (input, permutation hash) -> permuted activation
    for node in graph.node:
        name = None
        if node.op_type == "MatMul" and node.input[1] in inits:
            arr = numpy_helper.to_array(inits[node.input[1]])
            if arr.ndim == 2 and arr.dtype == dtype:
                names = wanted.get(_key(arr))
                name = names.pop(0) if names else None
        if name is None:
            nodes.append(node)
            continue
        lc, perm = sort_groups(codes[name])
        stem = name.replace(".", "_")
        x = node.input[0]
        if perm is not None:
            key = (x, _key(perm))
            if key not in gathers:
                gathers[key] = f"{stem}.act_order_input"
                new_inits.append(numpy_helper.from_array(perm, f"{stem}.act_order"))
                nodes.append(helper.make_node("Gather", [x, f"{stem}.act_order"], [gathers[key]],
                                              name=f"{stem}_act_order", axis=-1))
            x = gathers[key]
        t = matmulnbits_tensors(lc, dtype)
        ins = [x]
        for k in ("B", "scales", "zero_points"):
            new_inits.append(numpy_helper.from_array(t[k], f"{stem}.{k}"))
            ins.append(f"{stem}.{k}")
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


def _fold_wanted_transposes(proto, wanted: dict) -> None:
    """Fold Transpose(initializer) into a transposed initializer only where the result is a weight we
    replace: folding the others (the tied embedding's transpose for lm_head) would store a second float copy."""
    from onnx import numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    keep = []
    for node in graph.node:
        if node.op_type == "Transpose" and node.input[0] in inits:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            arr = np.ascontiguousarray(np.transpose(numpy_helper.to_array(inits[node.input[0]]), perm))
            if arr.ndim == 2 and _key(arr) in wanted:
                graph.initializer.append(numpy_helper.from_array(arr, node.output[0]))
                continue
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def read_back(proto, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(codes [N, K], zeros [N, G], scales [N, G], act-order permutation or None) of linear ``name`` as
    the ONNX graph holds them: the inverse of `replace_matmuls`, used by tests and checks."""
    from onnx import numpy_helper

    stem = name.replace(".", "_")
    inits = {t.name: t for t in proto.graph.initializer}
    node = next(n for n in proto.graph.node if n.name == f"{stem}_MatMulNBits")
    attrs = {a.name: a.i for a in node.attribute}
    n, k, bs = attrs["N"], attrs["K"], attrs["block_size"]
    b = numpy_helper.to_array(inits[node.input[1]])
    codes = np.stack([b & 0xF, b >> 4], -1).reshape(n, -1)[:, :k].astype(np.int32)
    g = -(-k // bs)
    scales = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).reshape(n, g)
    zp = numpy_helper.to_array(inits[node.input[3]])
    zeros = np.stack([zp & 0xF, zp >> 4], -1).reshape(n, -1)[:, :g].astype(np.int32)
    perm = None
    src = next((m for m in proto.graph.node if node.input[0] in m.output), None)
    if src is not None and src.op_type == "Gather" and src.name.endswith("_act_order"):
        perm = numpy_helper.to_array(inits[src.input[1]])
    return codes, zeros, scales, perm


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
