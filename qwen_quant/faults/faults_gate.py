"""Faults the eval-text checks cannot see, planted for the gate's table, flag, template, special-token,
generation-default and crash-safety checks (`qwen_quant.validate.tables`).

``plant_gate(src, fault, out, seed)`` copies an artifact and damages the copy; like
`qwen_quant.faults.plant.plant`, every choice comes from ``seed``.

=============== ============================================================ ===================
fault           what changes                                                 caught as
=============== ============================================================ ===================
rare_tokens     two tokens of ids >= 100000 swap (no eval paragraph reaches)  metadata (exit 1)
add_bos         add_bos_token true (tokenizer_config.json, GGUF key)          metadata (exit 1)
config_template another template in tokenizer_config.json only (the .jinja    metadata (exit 1)
                file stays the source's)
eos_token       tokenizer_config.json eos_token names another token          metadata (exit 1)
sampling        generation_config.json / genai search: do_sample, temperature metadata (exit 1)
vocab_crash     GGUF: tokenizer.ggml.model contradicts the token list          unusable (exit 2)
                (llama.cpp's tokenizer throws a C++ exception: SIGABRT)
token_types     GGUF: eos id outside the vocabulary                           unusable (exit 2)
=============== ============================================================ ===================
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from qwen_quant.faults.plant import OTHER_TEMPLATES, _json_edit, artifact_type

GATE_EXPECT = {"rare_tokens": "metadata", "add_bos": "metadata", "config_template": "metadata",
               "eos_token": "metadata", "sampling": "metadata", "vocab_crash": "unusable", "token_types": "unusable"}
APPLIES = {"rare_tokens": ("hf", "onnx", "gguf"), "add_bos": ("hf", "onnx", "gguf"), "config_template": ("hf", "onnx"),
           "eos_token": ("hf", "onnx"), "sampling": ("hf", "onnx"), "vocab_crash": ("gguf",), "token_types": ("gguf",)}


def plant_gate(src: str | Path, fault: str, out: str | Path, seed: int = 0) -> str:
    """Copy ``src`` to ``out``, plant ``fault`` (table above) in the copy; returns what was done."""
    src, out = Path(src), Path(out)
    kind = artifact_type(src)
    if kind not in APPLIES[fault]:
        raise ValueError(f"fault {fault} does not apply to {kind} artifacts")
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, out) if src.is_dir() else shutil.copyfile(src, out)
    rng = random.Random(f"gate:{fault}:{seed}")
    return globals()[f"_{'gguf' if kind == 'gguf' else 'folder'}_{fault}"](out, rng)


def _rare_pair(tokens: list[str], rng: random.Random) -> tuple[int, int]:
    by_len: dict[int, list[int]] = {}
    for i in range(100000, min(len(tokens), 151000)):
        by_len.setdefault(len(tokens[i].encode()), []).append(i)
    group = rng.choice([g for g in by_len.values() if len(g) >= 2])
    a, b = rng.sample(group, 2)
    return a, b


# ---- HF and ONNX folders (tokenizer files beside the weights) -----------------------------------

def _folder_rare_tokens(out: Path, rng) -> str:
    done = []

    def swap(d):
        vocab = d["model"]["vocab"]
        inv = {i: t for t, i in vocab.items()}
        a, b = _rare_pair([inv.get(i, "") for i in range(max(inv) + 1)], rng)
        vocab[inv[a]], vocab[inv[b]] = b, a
        done.append((a, b))
    _json_edit(out / "tokenizer.json", swap)
    return f"tokenizer.json ids {done[0]} swapped"


def _folder_add_bos(out: Path, rng) -> str:
    _json_edit(out / "tokenizer_config.json", lambda d: d.__setitem__("add_bos_token", True))
    return "tokenizer_config.json add_bos_token set to true"


def _folder_config_template(out: Path, rng) -> str:
    _json_edit(out / "tokenizer_config.json", lambda d: d.__setitem__("chat_template", rng.choice(OTHER_TEMPLATES)))
    return "tokenizer_config.json chat_template replaced (chat_template.jinja kept)"


def _folder_eos_token(out: Path, rng) -> str:
    _json_edit(out / "tokenizer_config.json", lambda d: d.__setitem__("eos_token", "<|im_start|>"))
    return "tokenizer_config.json eos_token set to <|im_start|>"


def _folder_sampling(out: Path, rng) -> str:
    temp = rng.choice((0.6, 0.7, 0.8))
    if (out / "genai_config.json").is_file():
        def edit(d):
            d["search"]["do_sample"], d["search"]["temperature"] = True, temp
        _json_edit(out / "genai_config.json", edit)
        return f"genai_config.json search do_sample true, temperature {temp}"
    gen = out / "generation_config.json"
    d = json.loads(gen.read_text()) if gen.is_file() else {}
    d.update(do_sample=True, temperature=temp)
    gen.write_text(json.dumps(d, indent=2))
    return f"generation_config.json do_sample true, temperature {temp}"


# ---- GGUF files ---------------------------------------------------------------------------------

def _gguf_rare_tokens(out: Path, rng) -> str:
    from qwen_quant.formats.integrity import GGUFIndex

    idx = GGUFIndex(out)
    toks = idx.strings("tokenizer.ggml.tokens")
    idx.close()
    a, b = _rare_pair([t.decode("utf-8", "replace") for _, t in toks], rng)
    (oa, ta), (ob, tb) = toks[a], toks[b]
    with open(out, "r+b") as fh:
        fh.seek(oa)
        fh.write(tb)
        fh.seek(ob)
        fh.write(ta)
    return f"tokenizer.ggml.tokens ids {a} and {b} swapped"


def _gguf_add_bos(out: Path, rng) -> str:
    """Add ``tokenizer.ggml.add_bos_token = true`` (a bool key; the file is rewritten, tensor data re-aligned)."""
    import struct

    from qwen_quant.formats.integrity import GGUFIndex

    idx = GGUFIndex(out)
    buf = idx.buf
    key = b"tokenizer.ggml.add_bos_token"
    if key.decode() in idx.kv:
        raise ValueError(f"{out} already has {key.decode()}")
    head = bytearray(buf[:24])
    struct.pack_into("<Q", head, 16, struct.unpack_from("<Q", head, 16)[0] + 1)
    meta = bytes(head) + buf[24:idx.kv_end] + struct.pack("<Q", len(key)) + key + struct.pack("<IB", 7, 1) \
        + buf[idx.kv_end:idx.info_end]
    align = int(idx.get("general.alignment") or 32)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(meta + b"\0" * (-len(meta) % align))
        fh.write(buf[idx.data_start:])
    idx.close()
    tmp.replace(out)
    return "tokenizer.ggml.add_bos_token set to true"


def _gguf_vocab_crash(out: Path, rng) -> str:
    from qwen_quant.faults.gguf import _gguf_set_string

    model = rng.choice(("llama",))  # SentencePiece over a byte-level BPE token list: llama.cpp throws and aborts
    _gguf_set_string(out, "tokenizer.ggml.model", model)
    return f"tokenizer.ggml.model set to {model}"


def _gguf_token_types(out: Path, rng) -> str:
    from qwen_quant.formats.integrity import GGUFIndex
    from qwen_quant.faults.gguf import _gguf_set

    idx = GGUFIndex(out)
    n = idx.get("tokenizer.ggml.tokens")[2]
    idx.close()
    _gguf_set(out, "tokenizer.ggml.eos_token_id", n + rng.randrange(1, 1000))
    return "tokenizer.ggml.eos_token_id set outside the vocabulary"
