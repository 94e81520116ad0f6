"""GGUF faults for `qwen_quant.faults.plant`: keys, tokens and tensor scales edited in the file.

Edits go through `qwen_quant.formats.integrity.GGUFIndex` (byte offsets of every key and tensor), so
same-size changes are made in place and string changes rewrite only the metadata, re-aligning the
tensor data: gguf-py's reader would parse the whole vocabulary into numpy objects for every fault.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qwen_quant.faults.plant import OTHER_PRE, OTHER_TEMPLATES, _noise, _other_id, _swap_pairs, _truncate

def _gguf_index(path: Path):
    from qwen_quant.formats.integrity import GGUFIndex

    return GGUFIndex(path)


def _gguf_set(path: Path, key: str, value) -> None:
    """Overwrite a numeric key in place (same type, same size)."""
    import struct

    from qwen_quant.formats.integrity import GGUF_SCALAR

    idx = _gguf_index(path)
    vtype, _, start, _ = idx.kv[key]
    idx.close()
    with open(path, "r+b") as fh:
        fh.seek(start)
        fh.write(struct.pack(GGUF_SCALAR[vtype], value))


def _gguf_set_string(path: Path, key: str, value: str) -> None:
    """Replace (or add) a string key; the file is rewritten with its tensor data re-aligned."""
    import struct

    idx = _gguf_index(path)
    buf, enc = idx.buf, value.encode()
    new_value = struct.pack("<Q", len(enc)) + enc
    head = bytearray(buf[:24])
    if key in idx.kv:
        _, _, start, end = idx.kv[key]
        kvs = buf[24:start] + new_value + buf[end:idx.kv_end]
    else:
        k = key.encode()
        kvs = buf[24:idx.kv_end] + struct.pack("<Q", len(k)) + k + struct.pack("<I", 8) + new_value
        struct.pack_into("<Q", head, 16, struct.unpack_from("<Q", head, 16)[0] + 1)
    infos = buf[idx.kv_end:idx.info_end]
    align = int(idx.get("general.alignment") or 32)
    meta = bytes(head) + kvs + infos
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(meta + b"\0" * (-len(meta) % align))
        fh.write(buf[idx.data_start:])
    idx.close()
    tmp.replace(path)


def _gguf_get(path: Path, key: str):
    idx = _gguf_index(path)
    try:
        return idx.get(key)
    finally:
        idx.close()


def _gguf_tokenizer(out, rng, **_) -> str:
    idx = _gguf_index(out)
    toks = idx.strings("tokenizer.ggml.tokens")
    idx.close()
    pairs = _swap_pairs([t.decode("utf-8", "replace") for _, t in toks], rng)
    with open(out, "r+b") as fh:
        for a, b in pairs:
            (oa, ta), (ob, tb) = toks[a], toks[b]
            fh.seek(oa)
            fh.write(tb)
            fh.seek(ob)
            fh.write(ta)
    return f"{len(pairs)} token pairs swapped in tokenizer.ggml.tokens"


def _gguf_pretokenizer(out, rng, **_) -> str:
    pre = rng.choice([p for p in OTHER_PRE if p != _gguf_get(out, "tokenizer.ggml.pre")])
    _gguf_set_string(out, "tokenizer.ggml.pre", pre)
    return f"tokenizer.ggml.pre set to {pre}"


def _gguf_special_tokens(out, rng, **_) -> str:
    new = _other_id(rng)
    _gguf_set(out, "tokenizer.ggml.eos_token_id", new)
    return f"tokenizer.ggml.eos_token_id set to {new}"


def _gguf_template(out, rng, **_) -> str:
    _gguf_set_string(out, "tokenizer.chat_template", rng.choice(OTHER_TEMPLATES))
    return "tokenizer.chat_template replaced by another family's"


def _gguf_num(out, key_suffix: str, fn) -> str:
    arch = _gguf_get(out, "general.architecture")
    key = f"{arch}.{key_suffix}"
    old = _gguf_get(out, key)
    _gguf_set(out, key, fn(old))
    return f"{key} {old} -> {fn(old)}"


def _gguf_rope(out, rng, **_) -> str:
    f = rng.choice((10000.0, 500000.0, 5000000.0))
    return _gguf_num(out, "rope.freq_base", lambda v: f if f != v else f * 2)


def _gguf_eps(out, rng, **_) -> str:
    f = rng.choice((1e-5, 1e-12))
    return _gguf_num(out, "attention.layer_norm_rms_epsilon", lambda v: f if not np.isclose(f, v) else f * 10)


def _gguf_context(out, rng, **_) -> str:
    f = rng.choice((0.5, 2, 8))
    return _gguf_num(out, "context_length", lambda v: int(v * f))


# byte offset of the fp16 super-block scale ``d`` inside one block, per GGML type
_D_OFFSET = {"Q4_0": 0, "Q4_1": 0, "Q5_0": 0, "Q5_1": 0, "Q8_0": 0, "Q4_K": 0, "Q5_K": 0, "Q2_K": 80, "Q3_K": 108, "Q6_K": 208}


def _gguf_numeric(out, rng, strength=0.05, **_) -> str:
    """Noise on every 2-D tensor of one block: F32/F16 values, or the fp16 scale ``d`` of each quantized block."""
    import gguf

    idx = _gguf_index(out)
    names = {int(t): t.name for t in gguf.GGMLQuantizationType}
    blocks = sorted({t[0].split(".")[1] for t in idx.tensors if t[0].startswith("blk.")}, key=int)
    blk = rng.choice(blocks)
    cands = sorted((t for t in idx.tensors if t[0].startswith(f"blk.{blk}.") and len(t[1]) == 2
                    and names.get(t[2]) in {*_D_OFFSET, "F32", "F16"}), key=lambda t: t[0])
    spans = [(idx.data_start + off, idx.nbytes(dims, ttype), names[ttype], ttype) for _, dims, ttype, off in cands]
    idx.close()
    for start, nbytes, qname, ttype in spans:
        raw = np.memmap(out, dtype=np.uint8, mode="r+", offset=start, shape=(nbytes,))
        if qname in ("F32", "F16"):
            v = raw.view(np.float32 if qname == "F32" else np.float16)
            v[:] = (v.astype(np.float32) * _noise(rng, v.shape, strength)).astype(v.dtype)
        else:
            size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)][1]  # bytes per block
            b = raw.reshape(-1, size)
            o = _D_OFFSET[qname]
            d = np.ascontiguousarray(b[:, o:o + 2]).view(np.float16).reshape(-1)
            d = (d.astype(np.float32) * _noise(rng, d.shape, strength)).astype(np.float16)
            b[:, o:o + 2] = d.view(np.uint8).reshape(-1, 2)
        raw.flush()
        del raw
    return f"blk.{blk}: {len(spans)} tensors x (1 + {strength:g} * N(0, 1))"


def _gguf_truncate(out, rng, **_) -> str:
    return _truncate(out, rng)


def _gguf_config(out, rng, variant=None, **_) -> str:
    step = 64 if variant == "feed_forward_length" else 32
    return "config/tensor mismatch: " + _gguf_num(out, variant, lambda v: int(v) + step)
