"""Is an artifact usable at all? Damaged files and configs that contradict their tensors, as one-line errors.

Every loading point calls one of these before handing a file to a library, because the libraries
report such damage late and obliquely: a config.json whose ``bits`` disagrees with the packed tensors
surfaces as a numpy broadcast error, a truncated safetensors shard only fails when the cut tensor is
read, and llama.cpp says "failed to load model" without naming the tensor. Each check reads headers
only (safetensors JSON header, GGUF tensor infos, the ONNX graph without its external data), so it
costs milliseconds even for a 72B checkpoint, and raises ``QuantError`` naming the file, what is
wrong and what to do (exit 2: unusable input, never "regression").

The safetensors header is parsed by hand (8-byte length + JSON, the format's whole specification)
because the safetensors library maps the file lazily and does not compare offsets with the size.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np

from qwen_quant.errors import QuantError

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}

def safetensors_header(path: Path) -> dict[str, dict]:
    """name -> {dtype, shape, data_offsets} of one safetensors file, after checking the file is whole."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise ValueError(f"header claims {n} bytes but the file has {size}")
            header = json.loads(fh.read(n))
    except (ValueError, UnicodeDecodeError) as err:
        raise QuantError(f"{path} is not a readable safetensors file ({err}); the file is truncated or corrupt, "
                         "copy or re-create it") from None
    header.pop("__metadata__", None)
    end = 0
    for name, t in header.items():
        a, b = t["data_offsets"]
        want = math.prod(t["shape"]) * DTYPE_BYTES.get(t["dtype"], 0)
        if want and b - a != want:  # sub-byte or new dtypes: only the extent is checked
            raise QuantError(f"{path}: tensor {name} spans {b - a} bytes but {t['dtype']}{t['shape']} needs {want}; "
                             "the file is corrupt, re-create it")
        end = max(end, b)
    if 8 + n + end > size:
        raise QuantError(f"{path} is truncated: its tensors need {8 + n + end} bytes but the file has {size}; "
                         "copy or re-create it")
    return header


def checkpoint_shapes(model_dir: Path) -> dict[str, tuple[list[int], str]]:
    """tensor name -> (shape, file name) over every shard, each shard checked whole."""
    idx = model_dir / "model.safetensors.index.json"
    files = sorted(model_dir.glob("*.safetensors"))
    if idx.exists():
        try:
            wanted = set(json.loads(idx.read_text())["weight_map"].values())
        except (ValueError, KeyError) as err:
            raise QuantError(f"{idx} is not a valid safetensors index ({err}); re-create the checkpoint") from None
        missing = sorted(w for w in wanted if not (model_dir / w).exists())
        if missing:
            raise QuantError(f"{model_dir}: shard {missing[0]} named in model.safetensors.index.json is missing; "
                             "the download or copy is incomplete")
    out: dict[str, tuple[list[int], str]] = {}
    for f in files:
        for name, t in safetensors_header(f).items():
            out[name] = (t["shape"], f.name)
    return out


def _quant_args(cfg: dict, where: str = "config.json") -> tuple[str | None, int, int]:
    """(format name, weight bits, group size) from the format table; (None, 16, -1) at full precision."""
    from qwen_quant.formats.table import detect, quantization_config_of

    fmt = detect(cfg, where)
    if fmt is None:
        return None, 16, -1
    return (fmt.name, *fmt.bits_group(quantization_config_of(cfg)))


def check_checkpoint(model_dir: str | Path, cfg: dict[str, Any], family) -> None:
    """Raise QuantError unless every shard is whole and config.json agrees with the tensors.

    ``family`` (a `qwen_quant.models.Family`) gives the tensor paths and each linear's shape."""
    from qwen_quant.models.family import template_of

    d = Path(model_dir)
    shapes = checkpoint_shapes(d)
    cj = d / "config.json"

    def bad(what: str, fix: str) -> QuantError:
        return QuantError(f"{cj}: {what}; {fix}")

    if "vocab_size" not in cfg or "hidden_size" not in cfg:
        return  # not a Qwen2-style config: leave it to transformers
    embed, head = f"{family.embed_path}.weight", f"{family.lm_head_path}.weight"
    emb = shapes.get(embed)
    if emb is None:
        raise bad(f"{embed} is missing from the weights", "the checkpoint is incomplete, re-create it")
    if emb[0][0] != cfg["vocab_size"]:
        raise bad(f"vocab_size {cfg['vocab_size']} disagrees with {embed} ({emb[0][0]} rows in {emb[1]})",
                  "set vocab_size to the embedding's rows or use the config of the model these weights came from")
    if emb[0][1] != cfg["hidden_size"]:
        raise bad(f"hidden_size {cfg['hidden_size']} disagrees with {embed} ({emb[0][1]} columns)",
                  "use the config of the model these weights came from")
    heads = [n for n in shapes if n.startswith(family.lm_head_path + ".")]
    if not cfg.get("tie_word_embeddings", False) and not heads:
        raise bad("tie_word_embeddings is false but the weights have no lm_head", "the lm_head tensor is missing: "
                  "re-create the checkpoint (or set tie_word_embeddings true if the model really ties them)")
    if head in shapes and shapes[head][0][0] != cfg["vocab_size"]:
        raise bad(f"vocab_size {cfg['vocab_size']} disagrees with {head} ({shapes[head][0][0]} rows)",
                  "use the config of the model these weights came from")
    method, bits, gs = _quant_args(cfg, str(cj))
    if family.linear_shapes is None:
        return
    dims = family.linear_shapes(cfg)
    for layer in range(cfg.get("num_hidden_layers", 0)):
        for lin in (n for g in family.layer_groups(cfg, layer) for n in g):
            i, o = dims[template_of(lin)]
            _check_linear(f"{family.layers_path}.{layer}.{lin}", i, o, shapes, method, bits, gs, bad)
    from qwen_quant.formats.fp8 import is_fp8

    if is_fp8(cfg.get("quantization_config")):
        _check_fp8(d, cfg, family, dims, bad)


def _check_fp8(d: Path, cfg: dict, family, dims: dict, bad) -> None:
    """FP8 linears: e4m3 weight, a float scale beside it, its shape the block grid (or one per channel)."""
    from qwen_quant.formats.fp8 import scale_name, scheme_of
    from qwen_quant.models.family import template_of

    qc = cfg["quantization_config"]
    sname, (block, _) = scale_name(qc), scheme_of(qc)
    bs = qc.get("weight_block_size") or [block, block]
    ignore = set(qc.get("modules_to_not_convert") or qc.get("ignore") or [])
    dtypes = {k: (t["dtype"], t["shape"]) for f in sorted(d.glob("*.safetensors")) for k, t in safetensors_header(f).items()}
    for layer in range(cfg.get("num_hidden_layers", 0)):
        for lin in (n for g in family.layer_groups(cfg, layer) for n in g):
            name = f"{family.layers_path}.{layer}.{lin}"
            i, o = dims[template_of(lin)]
            w, s = dtypes.get(f"{name}.weight"), dtypes.get(f"{name}.{sname}")
            if w is None:
                continue  # reported by the shape check
            if w[0] != "F8_E4M3":
                if s is not None or name not in ignore:
                    raise bad(f"{name}.weight is {w[0]}, expected F8_E4M3 for an FP8 checkpoint "
                              f"(the module is not in {'modules_to_not_convert' if sname == 'weight_scale_inv' else 'ignore'})",
                              "re-create the checkpoint with qwen-quant fp8")
                continue
            if s is None:
                raise bad(f"{name}.{sname} is missing beside its F8_E4M3 weight", "the checkpoint is incomplete, re-create it")
            if s[0] not in ("F32", "BF16", "F16"):
                raise bad(f"{name}.{sname} is {s[0]}, expected a float scale (F32 or BF16)", "re-create the checkpoint")
            want = [o, 1] if block is None else [-(-o // int(bs[0])), -(-i // int(bs[1]))]
            if list(s[1]) != want:
                what = "one scale per output channel" if block is None else f"weight_block_size {list(bs)}"
                raise bad(f"{name}.{sname} has shape {list(s[1])} but {what} needs {want} for a {o}x{i} weight",
                          "set the block size the scales were written with, or re-quantize")


def _check_linear(name, i, o, shapes, method, bits, gs, bad) -> None:
    groups = 1 if gs in (-1, 0) else -(-i // gs)
    what = "intermediate_size" if "mlp" in name else "the attention shape (heads, head_dim, hidden_size)"

    def shape(suffix):
        return shapes.get(f"{name}.{suffix}", (None, None))[0]

    if method in ("gptq", "awq"):
        qw, sc = shape("qweight"), shape("scales")
        if qw is None and shape("weight") is not None:
            return  # left unquantized (modules_to_not_convert)
        if qw is None or sc is None:
            raise bad(f"{name}.qweight/scales are missing", "the checkpoint is incomplete, re-create it")
        packed_in, packed_out = (i * bits / 32, o) if method == "gptq" else (i, o * bits / 32)
        if qw != [packed_in, packed_out]:
            real = 32 * qw[0] / i if method == "gptq" else 32 * qw[1] / o
            fixed = qw[1] == o if method == "gptq" else qw[0] == i
            if fixed and real in (2, 3, 4, 8) and real != bits:
                raise bad(f"bits={bits} but {name}.qweight {qw} holds {real:g}-bit codes for {i}x{o} weights",
                          "set quantization_config.bits to what the tensors were packed with, or re-quantize")
            raise bad(f"{name}.qweight has shape {qw}, expected {[int(packed_in), int(packed_out)]} for {i} inputs, "
                      f"{o} outputs at {bits} bits; check {what} and bits", "use the config these tensors were written with")
        if sc != [groups, o]:
            real = f"group_size {i // sc[0]}" if sc[0] and i % sc[0] == 0 and sc[1] == o else f"shape {sc}"
            raise bad(f"group_size={gs} needs {name}.scales of shape {[groups, o]} but it has {real}",
                      "set quantization_config.group_size to what the tensors were written with, or re-quantize")
    elif method == "compressed-tensors" and shape("weight_packed") is not None:
        wp, sc = shape("weight_packed"), shape("weight_scale")
        if wp != [o, i * bits // 32]:
            real = 32 * wp[1] / i if wp[0] == o else None
            if real in (2, 3, 4, 8) and real != bits:
                raise bad(f"num_bits={bits} but {name}.weight_packed {wp} holds {real:g}-bit codes for {i}x{o} weights",
                          "set the quantization config's num_bits to what the tensors were packed with, or re-quantize")
            raise bad(f"{name}.weight_packed has shape {wp}, expected {[o, i * bits // 32]}; check {what} and num_bits",
                      "use the quantization config these tensors were written with, or re-quantize")
        if sc is None or sc != [o, groups]:
            raise bad(f"group_size={gs} needs {name}.weight_scale of shape {[o, groups]} but it has {sc}",
                      "use the quantization config these tensors were written with, or re-quantize")
    else:
        w = shape("weight")
        if w is None:
            if shape("weight_packed") is None and shape("qweight") is None:
                raise bad(f"{name}.weight is missing from the weights", "the checkpoint is incomplete, re-create it")
            return
        if w != [o, i]:
            raise bad(f"{name}.weight has shape {w} but the config implies {[o, i]}; check {what}",
                      "use the config of the model these weights came from")


def gidx_convention(model_dir: str | Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """Which g_idx convention validation used, and whether serving kernels compute the same.

    With ``desc_act`` false, Marlin and ExLlama (vLLM, transformers) ignore ``g_idx`` and use
    ``col // group_size``; our dequantizer applies ``g_idx``. The two agree exactly when g_idx is
    that trivial order, so that is what is checked; act-order checkpoints are read through g_idx by
    every kernel, as here.
    """
    from safetensors import safe_open

    qc = cfg.get("quantization_config") or {}
    gs = int(qc.get("group_size") or -1)
    if qc.get("desc_act"):
        return {"name": "g_idx convention", "ok": True, "expected": "g_idx applied (desc_act=true, act-order)",
                "actual": "g_idx applied", "reason": "act-order checkpoints are read through g_idx by every kernel"}
    d = Path(model_dir)
    odd = None
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "np") as h:
            for k in h.keys():
                if k.endswith(".g_idx"):
                    g = h.get_tensor(k).astype(np.int64)
                    want = np.arange(len(g)) // (len(g) if gs == -1 else gs)
                    if not np.array_equal(g, want):
                        odd = k
                        break
        if odd:
            break
    ok = odd is None
    return {"name": "g_idx convention", "ok": ok, "expected": "col // group_size (desc_act=false: what Marlin/ExLlama compute)",
            "actual": "col // group_size" if ok else f"{odd} is not col // group_size",
            "reason": "validated weights equal served weights" if ok else
            f"{d.name}: desc_act=false but {odd} reorders groups; Marlin/ExLlama ignore g_idx, so served weights differ "
            "from the validated ones (set desc_act true or rewrite g_idx)"}


GGUF_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
GGUF_STRING, GGUF_ARRAY = 8, 9


class GGUFIndex:
    """Where every key, value and tensor of a GGUF file lies (offsets into the file), read with struct.

    Hand-written because gguf-py's GGUFReader builds numpy objects for every element of every array,
    which takes seconds (tens of seconds on a busy machine) for a Qwen vocabulary of 152k tokens and
    151k merges, on every load; this walks the same bytes in a fraction of a second. The format is
    small: header, key/values (typed scalars, strings, arrays), tensor infos, aligned data.
    """

    def __init__(self, path: str | Path):
        import mmap

        self.path = Path(path)
        with open(self.path, "rb") as fh:
            self.buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        if self.buf[:4] != b"GGUF":
            raise ValueError("no GGUF magic at the start")
        self.version, n_tensors, n_kv = struct.unpack_from("<IQQ", self.buf, 4)
        pos = 24
        self.kv: dict[str, tuple[int, Any, int, int]] = {}  # key -> (type, value, value offset, value end)
        for _ in range(n_kv):
            key, pos = self._string(pos)
            (vtype,) = struct.unpack_from("<I", self.buf, pos)
            start = pos + 4
            value, pos = self._value(vtype, start)
            self.kv[key.decode("utf-8", "replace")] = (vtype, value, start, pos)
        self.kv_end = pos
        self.tensors: list[tuple[str, list[int], int, int]] = []  # (name, dims, ggml type, offset in data)
        for _ in range(n_tensors):
            name, pos = self._string(pos)
            (nd,) = struct.unpack_from("<I", self.buf, pos)
            dims = list(struct.unpack_from(f"<{nd}Q", self.buf, pos + 4))
            ttype, off = struct.unpack_from("<IQ", self.buf, pos + 4 + 8 * nd)
            pos += 4 + 8 * nd + 12
            self.tensors.append((name.decode("utf-8", "replace"), dims, ttype, off))
        self.info_end = pos
        align = int(self.get("general.alignment") or 32)
        self.data_start = -(-pos // align) * align

    def _string(self, pos: int) -> tuple[bytes, int]:
        (n,) = struct.unpack_from("<Q", self.buf, pos)
        if pos + 8 + n > len(self.buf):
            raise ValueError(f"a string at byte {pos} runs past the end of the file")
        return self.buf[pos + 8:pos + 8 + n], pos + 8 + n

    def _value(self, vtype: int, pos: int):
        if vtype in GGUF_SCALAR:
            fmt = GGUF_SCALAR[vtype]
            return struct.unpack_from(fmt, self.buf, pos)[0], pos + struct.calcsize(fmt)
        if vtype == GGUF_STRING:
            raw, end = self._string(pos)
            return raw.decode("utf-8", "replace"), end
        if vtype == GGUF_ARRAY:
            etype, count = struct.unpack_from("<IQ", self.buf, pos)
            pos += 12
            if etype in GGUF_SCALAR:
                return ("array", etype, count, pos), pos + count * struct.calcsize(GGUF_SCALAR[etype])
            start = pos
            for _ in range(count):
                _, pos = self._value(etype, pos) if etype != GGUF_STRING else self._string(pos)
            return ("array", etype, count, start), pos
        raise ValueError(f"unknown value type {vtype} at byte {pos}")

    def get(self, key: str):
        v = self.kv.get(key)
        return None if v is None else v[1]

    def strings(self, key: str) -> list[tuple[int, bytes]]:
        """(byte offset of the characters, bytes) of each element of a string array."""
        _, (_, etype, count, pos), _, _ = self.kv[key]
        out = []
        for _ in range(count):
            raw, nxt = self._string(pos)
            out.append((pos + 8, raw))
            pos = nxt
        return out

    def nbytes(self, dims: list[int], ttype: int) -> int:
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        return math.prod(dims) // block * size

    def close(self) -> None:
        self.buf.close()


def check_gguf(path: str | Path) -> None:
    """A GGUF whose header parses and whose tensors all lie inside the file, with shapes that match its keys."""
    p = Path(path)
    size = p.stat().st_size
    try:
        idx = GGUFIndex(p)
    except (ValueError, struct.error, IndexError) as err:
        raise QuantError(f"{p} is not a readable GGUF file ({err}); it is truncated or corrupt, re-export it") from None
    try:
        for name, dims, ttype, off in idx.tensors:
            end = idx.data_start + off + idx.nbytes(dims, ttype)
            if end > size:
                raise QuantError(f"{p} is truncated: tensor {name} ends at byte {end} but the file has {size}; re-export it")
        arch = idx.get("general.architecture")
        tens = {name: dims for name, dims, _, _ in idx.tensors}  # gguf order: [in, out]
        for key, tensor, axis in ((f"{arch}.embedding_length", "token_embd.weight", 0),
                                  (f"{arch}.feed_forward_length", "blk.0.ffn_up.weight", 1)):
            v = idx.get(key) if arch else None
            if v is not None and tensor in tens and tens[tensor][axis] != int(v):
                raise QuantError(f"{p}: {key} = {v} but {tensor} has shape {tens[tensor]}; the metadata contradicts the "
                                 "tensors, re-export the GGUF")
        toks = idx.get("tokenizer.ggml.tokens")
        emb = tens.get("token_embd.weight")
        if toks is not None and emb is not None and toks[2] != emb[1]:
            raise QuantError(f"{p}: the vocabulary has {toks[2]} tokens but token_embd.weight has {emb[1]} rows; "
                             "re-export the GGUF")
    finally:
        idx.close()


def check_onnx(path: str | Path) -> None:
    """model.onnx parses, its external data files exist and are long enough, genai_config matches the graph."""
    import onnx
    from google.protobuf.message import DecodeError

    p = Path(path)
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as err:
        raise QuantError(f"{p} is not a readable ONNX model ({type(err).__name__}: {err}); it is truncated or corrupt, "
                         "re-export it") from None
    ends: dict[str, int] = {}
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in init.external_data}
        f = p.parent / info.get("location", "")
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        ends[str(f)] = max(ends.get(str(f), 0), end)
    for f, end in ends.items():
        fp = Path(f)
        if not fp.is_file():
            raise QuantError(f"{p}: external data file {fp.name} is missing; copy the whole ONNX folder")
        if fp.stat().st_size < end:
            raise QuantError(f"{fp} is truncated: {p.name} reads up to byte {end} but the file has {fp.stat().st_size}; "
                             "copy or re-export the ONNX folder")
    _check_genai(p, model)


def _check_genai(p: Path, model) -> None:
    gc = p.parent / "genai_config.json"
    if not gc.exists():
        return
    try:
        dec = json.loads(gc.read_text())["model"]["decoder"]
    except (ValueError, KeyError) as err:
        raise QuantError(f"{gc} is not a valid genai_config.json ({err}); re-export the ONNX folder") from None
    past = [i for i in model.graph.input if i.name.startswith("past_key_values.") and i.name.endswith(".key")]
    if past and dec.get("num_hidden_layers") not in (None, len(past)):
        raise QuantError(f"{gc}: num_hidden_layers {dec['num_hidden_layers']} but {p.name} has {len(past)} layers "
                         "of KV cache; re-export the ONNX folder")
    if past:
        dims = [d.dim_value for d in past[0].type.tensor_type.shape.dim]
        for key, axis in (("num_key_value_heads", 1), ("head_size", 3)):
            if len(dims) > axis and dims[axis] and dec.get(key) not in (None, dims[axis]):
                raise QuantError(f"{gc}: {key} {dec[key]} but {p.name} has {dims[axis]}; re-export the ONNX folder")
