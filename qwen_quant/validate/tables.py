"""Whole-table parity: the tokenizer's tables, tokenization flags, every chat-template source, the
declared special tokens and the generation defaults, each compared with the source checkpoint.

`validate.metadata` tokenizes 64 eval paragraphs through the artifact's runtime; a table edited where
those paragraphs never reach (a rare token, a late merge, an added token) passes that. So the tables
themselves are compared: HF tokenizers through ``tokenizer.json`` (vocabulary, merges, added tokens,
normalizer, pre-tokenizer, decoder), GGUF through ``tokenizer.ggml.*`` against the source's tables,
read with `formats.integrity.GGUFIndex` (byte offsets; gguf-py's reader would build 300k numpy
objects). Flags that change tokenization in a runtime are checked too: GGUF ``add_bos_token`` /
``add_eos_token`` / ``tokenizer.ggml.model``, the HF ``add_bos_token`` / ``add_eos_token``.

Chat templates: a checkpoint may carry one in ``chat_template.jinja``, in ``tokenizer_config.json``
and in GGUF metadata, and consumers prefer different ones (gguf-py's ``SpecialVocab``, which
convert_hf_to_gguf uses, reads tokenizer_config.json first); every source present is returned so
that each is rendered and compared with the source model's.

Generation defaults (``generation_config.json``: do_sample, temperature, top_p, top_k,
repetition_penalty; onnxruntime-genai's ``search`` section) change what ``generate()`` returns; a
difference is a failed check named ``generation <field>``, which ``qwen-quant check --allow NAME``
accepts when the user changed it on purpose.

`gguf_sanity` validates the GGUF tokenizer metadata before llama.cpp sees it (array lengths agree,
special ids inside the vocabulary, a known tokenizer model): llama.cpp aborts the process on some of
these contradictions instead of returning an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qwen_quant.errors import QuantError

GEN_FIELDS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
# transformers' GenerationConfig defaults: an absent field means this value to generate()
GEN_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}
TOKENIZER_PARTS = ("normalizer", "pre_tokenizer", "decoder")
GGUF_MODELS = {"BPE": "gpt2", "WordPiece": "bert", "Unigram": "t5"}


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (ValueError, UnicodeDecodeError):
        return {}


def _check(name, ok, expected, actual, reason=""):
    from qwen_quant.validate.metadata import _check as mk

    return mk(name, ok, expected, actual, reason)


class SourceTables:
    """The source checkpoint's tokenizer tables, as ``tokenizer.json`` and ``tokenizer_config.json`` hold them."""

    def __init__(self, ref: Path):
        self.raw = _json(ref / "tokenizer.json")
        self.config = _json(ref / "tokenizer_config.json")
        self.gen = _json(ref / "generation_config.json")
        model = self.raw.get("model") or {}
        self.model_type = model.get("type")
        vocab = dict(model.get("vocab") or {})
        for t in self.raw.get("added_tokens") or []:
            vocab[t["content"]] = t["id"]
        self.by_id: dict[int, str] = {i: t for t, i in vocab.items()}
        self.merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        self.added = sorted((t["id"], t["content"], bool(t.get("special"))) for t in self.raw.get("added_tokens") or [])

    def flag(self, name: str) -> bool:
        v = self.config.get(name)
        return bool(v) if v is not None else False

    def special(self, kind: str) -> str | None:
        v = self.config.get(f"{kind}_token")
        return v.get("content") if isinstance(v, dict) else v


def _first_diff(a: list, b: list) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def hf_table_checks(name: str, folder: Path, src: SourceTables) -> list[dict]:
    """tokenizer.json tables, tokenizer_config flags and declared special tokens vs the source's."""
    out = []
    raw, cfg = _json(folder / "tokenizer.json"), _json(folder / "tokenizer_config.json")
    if raw and src.raw:
        art = SourceTables(folder)
        vocab_diff = sorted(i for i in set(src.by_id) | set(art.by_id) if src.by_id.get(i) != art.by_id.get(i))
        out.append(_check("tokenizer vocabulary", not vocab_diff, f"{len(src.by_id)} tokens as the source",
                          f"{len(vocab_diff)} ids differ", "" if not vocab_diff else
                          f"{name}: tokenizer.json: {len(vocab_diff)} vocabulary ids differ from the source's (first: id "
                          f"{vocab_diff[0]} is {art.by_id.get(vocab_diff[0])!r}, source {src.by_id.get(vocab_diff[0])!r}); "
                          "ship the source's tokenizer"))
        d = _first_diff(art.merges, src.merges)
        out.append(_check("tokenizer merges", d is None, f"{len(src.merges)} merges as the source", "same" if d is None else
                          f"differs at {d}", "" if d is None else f"{name}: tokenizer.json: merges differ from the source's "
                          f"at rank {d} ({len(art.merges)} vs {len(src.merges)}); ship the source's tokenizer"))
        ok = art.added == src.added
        out.append(_check("tokenizer added tokens", ok, len(src.added), len(art.added), "" if ok else
                          f"{name}: tokenizer.json: added_tokens differ from the source's; ship the source's tokenizer"))
        for part in TOKENIZER_PARTS + ("model type",):
            a = raw.get(part) if part != "model type" else art.model_type
            b = src.raw.get(part) if part != "model type" else src.model_type
            ok = a == b
            out.append(_check(f"tokenizer {part}", ok, "as the source", "same" if ok else "differs", "" if ok else
                              f"{name}: tokenizer.json: {part} differs from the source's; ship the source's tokenizer"))
    if cfg or src.config:
        for flag in ("add_bos_token", "add_eos_token"):
            a, b = bool(cfg.get(flag) or False), src.flag(flag)
            out.append(_check(flag, a == b, b, a, "" if a == b else f"{name}: tokenizer_config.json: {flag} is {a} but "
                              f"{b} in the source; every prompt would be tokenized differently, ship the source's value"))
        for kind in ("bos", "eos", "pad"):
            v = cfg.get(f"{kind}_token")
            a, b = (v.get("content") if isinstance(v, dict) else v), src.special(kind)
            out.append(_check(f"{kind}_token", a == b, b, a, "" if a == b else f"{name}: tokenizer_config.json: "
                              f"{kind}_token is {a!r} but {b!r} in the source (fine-tuning appends the eos, vLLM stops on "
                              "it); ship the source's tokenizer_config.json"))
    return out


def generation_checks(name: str, folder: Path, src: SourceTables) -> list[dict]:
    """generation_config.json sampling defaults and onnxruntime-genai's ``search`` vs the source's."""
    out = []
    want = {k: src.gen.get(k, GEN_DEFAULTS[k]) for k in GEN_FIELDS}
    gen_path = folder / "generation_config.json"
    sources = []
    if gen_path.is_file():
        g = _json(gen_path)
        sources.append(("generation_config.json", {k: g.get(k, GEN_DEFAULTS[k]) for k in GEN_FIELDS}))
    genai = _json(folder / "genai_config.json")
    if genai.get("search"):
        s = genai["search"]
        sources.append(("genai_config.json search", {k: s.get(k, GEN_DEFAULTS[k]) for k in GEN_FIELDS}))
    for where, got in sources:
        for k in GEN_FIELDS:
            a, b = got[k], want[k]
            ok = a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(float(a) - float(b)) < 1e-6)
            out.append(_check(f"generation {k}", ok, b, a, "" if ok else f"{name}: {where}: {k} is {a} but {b} in the "
                              f"source, so generate() samples differently; restore it, or accept it with --allow "
                              f"'generation {k}'"))
    return out


def templates(folder: Path) -> dict[str, str]:
    """Every chat template a consumer of this HF/ONNX folder may use, by where it is."""
    out = {}
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        out["chat_template.jinja"] = jinja.read_text(errors="replace")
    t = _json(folder / "tokenizer_config.json").get("chat_template")
    if isinstance(t, str):
        out["tokenizer_config.json chat_template"] = t
    return out


def gguf_sanity(path: Path, idx) -> None:
    """Raise QuantError (one line, file and field) where the tokenizer metadata contradicts itself."""
    get = idx.get
    toks = get("tokenizer.ggml.tokens")
    if not isinstance(toks, tuple):
        raise QuantError(f"{path}: tokenizer.ggml.tokens is missing or not an array; re-export the GGUF")
    n = toks[2]
    for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        v = get(key)
        if v is not None and (not isinstance(v, tuple) or v[2] != n):
            raise QuantError(f"{path}: {key} has {v[2] if isinstance(v, tuple) else 'no'} entries but "
                             f"tokenizer.ggml.tokens has {n}; the tokenizer metadata is inconsistent, re-export the GGUF")
    model = get("tokenizer.ggml.model")
    if model not in (None, *GGUF_MODELS.values(), "llama", "rwkv", "none", "plamo2"):
        raise QuantError(f"{path}: tokenizer.ggml.model is {model!r}, not a tokenizer llama.cpp knows; re-export the GGUF")
    for key in ("bos_token_id", "eos_token_id", "padding_token_id", "eot_token_id", "unknown_token_id"):
        v = get(f"tokenizer.ggml.{key}")
        if v is not None and not (isinstance(v, int) and 0 <= v < n):
            raise QuantError(f"{path}: tokenizer.ggml.{key} is {v}, outside the {n}-token vocabulary; re-export the GGUF")
    if model == "gpt2" and not isinstance(get("tokenizer.ggml.merges"), tuple):
        raise QuantError(f"{path}: tokenizer.ggml.model is gpt2 but tokenizer.ggml.merges is missing; re-export the GGUF")


def gguf_table_checks(name: str, idx, src: SourceTables) -> list[dict]:
    """tokenizer.ggml.* against the source's tables and flags."""
    out = []
    get = idx.get
    if src.model_type:
        want = GGUF_MODELS.get(src.model_type, src.model_type)
        got = get("tokenizer.ggml.model")
        out.append(_check("tokenizer.ggml.model", got == want, want, got, "" if got == want else
                          f"{name}: tokenizer.ggml.model is {got!r} but the source's {src.model_type} tokenizer is "
                          f"{want!r} in llama.cpp; re-export the GGUF"))
    if src.by_id:
        toks = [t.decode("utf-8", "replace") for _, t in idx.strings("tokenizer.ggml.tokens")]
        diff = [i for i, t in enumerate(toks) if i in src.by_id and src.by_id[i] != t]
        diff += [i for i in src.by_id if i >= len(toks)]
        out.append(_check("tokenizer.ggml.tokens", not diff, f"{len(src.by_id)} tokens as the source", f"{len(diff)} differ",
                          "" if not diff else f"{name}: tokenizer.ggml.tokens: {len(diff)} ids differ from the source's "
                          f"tokenizer (first: id {diff[0]}); re-export the GGUF"))
    if src.merges and isinstance(get("tokenizer.ggml.merges"), tuple):
        merges = [t.decode("utf-8", "replace") for _, t in idx.strings("tokenizer.ggml.merges")]
        d = _first_diff(merges, src.merges)
        out.append(_check("tokenizer.ggml.merges", d is None, f"{len(src.merges)} merges", "same" if d is None else
                          f"differs at {d}", "" if d is None else f"{name}: tokenizer.ggml.merges differ from the source's "
                          f"at rank {d} ({len(merges)} vs {len(src.merges)}); re-export the GGUF"))
    for flag in ("add_bos_token", "add_eos_token"):
        v = get(f"tokenizer.ggml.{flag}")
        if v is None:
            continue
        a, b = bool(v), src.flag(flag)
        out.append(_check(f"tokenizer.ggml.{flag}", a == b, b, a, "" if a == b else f"{name}: tokenizer.ggml.{flag} is "
                          f"{a} but {b} in the source; llama.cpp would tokenize every prompt differently, re-export the GGUF"))
    return out
