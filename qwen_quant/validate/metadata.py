"""Metadata parity: does the artifact describe the same model to its runtime as the source does to transformers?

The metrics cannot see this: every backend is fed ids from the reference's HF tokenizer and greedy
decoding ignores EOS, so a GGUF with altered tokens, another pre-tokenizer, another family's chat
template or a wrong eos id scores exactly like a good one, and then misbehaves in every real
deployment. So each artifact's metadata is read *as its runtime reads it* and compared with the
source checkpoint:

- tokenizer: GGUF through llama.cpp's own tokenizer (vocab-only load); ONNX and HF checkpoints
  through the tokenizer files shipped beside the weights; ids on the shipped eval paragraphs must
  equal the source HF tokenizer's;
- special tokens: bos/eos/pad ids the runtime stops on or pads with must be ids the source
  declares (tokenizer_config, config.json or generation_config.json); ChatML's ``<|im_start|>`` and
  ``<|im_end|>`` must be single tokens with the source's ids;
- chat template: the artifact's template and the source's are both rendered on the shipped chat
  samples (same Jinja engine: transformers') and the texts compared;
- context length, rope theta, rope scaling and rms eps: GGUF keys via gguf-py, ``genai_config.json``
  and the config.json shipped with an ONNX export (optimum reads it), config.json of HF checkpoints;
- structure the GGUF keys and tensor names give llama.cpp: expert count, experts per token, expert
  and shared-expert FFN widths, whether a shared expert runs (its ``ffn_*_shexp`` tensors: llama.cpp
  has no count key for it), the attention head width (``key_length``, else hidden / heads) and the
  q/k norms (``attn_q_norm`` tensors);
- GPTQ's g_idx convention (see `qwen_quant.formats.integrity.gidx_convention`).

The result goes into the report as ``Result.metadata`` = ``{ok, checks: [{name, ok, expected,
actual, reason}]}``; `qwen-quant check` fails an artifact on any failed check.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from qwen_quant.backends import artifact_kind

MAX_PARAGRAPHS = 64  # eval paragraphs tokenized by each runtime (the whole shipped eval text has ~100)
MAX_CHATS = 8  # shipped chat samples rendered through each template
SPECIAL_TEXT = ("<|im_start|>", "<|im_end|>")


def _check(name: str, ok: bool, expected: Any, actual: Any, reason: str = "") -> dict[str, Any]:
    return {"name": name, "ok": bool(ok), "expected": _plain(expected), "actual": _plain(actual), "reason": reason}


def _plain(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (list, tuple, set)):
        return [_plain(x) for x in v]
    return v if isinstance(v, (int, float, str, bool, type(None), dict)) else str(v)


def _div(a, b):
    """a // b for GGUF's integer keys (llama.cpp's default head width), None where either is missing."""
    return a // b if isinstance(a, int) and isinstance(b, int) and b else None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (ValueError, UnicodeDecodeError):
        return {}


def _ids(v) -> set[int]:
    if v is None:
        return set()
    return {int(x) for x in v} if isinstance(v, (list, tuple)) else {int(v)}


# ---- the source model, as transformers reads it -------------------------------------------------

def hf_numbers(cfg: dict) -> dict[str, Any]:
    """context length, rope theta/scaling, rms eps from a config.json (transformers 4 and 5 spellings)."""
    rp = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or ({k: v for k, v in rp.items() if k != "rope_theta"} if rp else None)
    return {"context_length": cfg.get("max_position_embeddings"),
            "rope_theta": cfg.get("rope_theta", rp.get("rope_theta")),
            "rope_scaling": _scaling(scaling),
            "rms_eps": cfg.get("rms_norm_eps")}


def hf_structure(cfg: dict) -> dict[str, Any]:
    """What the family of a config.json says a runtime must hold: experts (count, used per token, FFN
    widths), the attention head width, and whether q/k carry their own RMSNorm."""
    from qwen_quant.models.registry import detect_family

    fam = detect_family(cfg, allow_unsupported=True)
    head_dim = cfg.get("head_dim")
    if head_dim is None and cfg.get("hidden_size") and cfg.get("num_attention_heads"):
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]  # transformers' default, and llama.cpp's
    out: dict[str, Any] = {"qk_norm": fam.qk_norm, "head_dim": head_dim}
    if fam.moe is not None:
        shared = cfg.get(fam.moe.shared_intermediate_key) if fam.moe.shared_intermediate_key else None
        out.update(expert_count=fam.moe.num_experts(cfg), expert_used_count=cfg.get(fam.moe.top_k_key),
                   expert_ff_length=cfg.get(fam.moe.intermediate_key), expert_shared_ff_length=shared,
                   shared_expert=bool(fam.moe.shared_expert and shared))
    return out


def _scaling(s: dict | None) -> tuple[str, float]:
    """('none', 1.0) or (type, factor): the part of rope scaling every runtime agrees on."""
    if not s:
        return ("none", 1.0)
    kind = s.get("rope_type") or s.get("type") or "none"
    if kind == "default":
        return ("none", 1.0)
    return (str(kind), float(s.get("factor") or 1.0))


def source_specials(ref: Path, tok) -> dict[str, set[int]]:
    cfg, gen = _read_json(ref / "config.json"), _read_json(ref / "generation_config.json")
    out = {}
    for kind in ("bos", "eos", "pad"):
        ids = _ids(cfg.get(f"{kind}_token_id")) | _ids(gen.get(f"{kind}_token_id"))
        tid = getattr(tok, f"{kind}_token_id", None)
        if tid is not None:
            ids.add(int(tid))
        out[kind] = ids
    return out


# ---- each runtime's view ------------------------------------------------------------------------

def gguf_view(path: Path, paragraphs: list[str]) -> dict[str, Any]:
    from qwen_quant.backends.llamacpp import tokenize_vocab_only
    from qwen_quant.formats.integrity import GGUFIndex

    from qwen_quant.validate.tables import gguf_sanity

    idx = GGUFIndex(path)  # gguf-py's reader parses the whole vocabulary into numpy objects: seconds
    try:
        gguf_sanity(path, idx)  # contradictions llama.cpp would abort on: one line, exit 2, before it loads
        get = idx.get
        arch = get("general.architecture") or ""
        kind = get(f"{arch}.rope.scaling.type")
        view = {"where": "GGUF keys, llama.cpp's tokenizer",
                "context_length": get(f"{arch}.context_length"), "rope_theta": get(f"{arch}.rope.freq_base"),
                "rope_scaling": ("none", 1.0) if kind in (None, "none") else (kind, float(get(f"{arch}.rope.scaling.factor") or 1.0)),
                "rms_eps": get(f"{arch}.attention.layer_norm_rms_epsilon"),
                "bos": get("tokenizer.ggml.bos_token_id"), "eos": get("tokenizer.ggml.eos_token_id"),
                "pad": get("tokenizer.ggml.padding_token_id"), "template": get("tokenizer.chat_template"),
                "pre": get("tokenizer.ggml.pre"),
                "expert_count": get(f"{arch}.expert_count"), "expert_used_count": get(f"{arch}.expert_used_count"),
                "expert_ff_length": get(f"{arch}.expert_feed_forward_length"),
                "expert_shared_ff_length": get(f"{arch}.expert_shared_feed_forward_length"),
                "head_dim": get(f"{arch}.attention.key_length") or _div(get(f"{arch}.embedding_length"),
                                                                         get(f"{arch}.attention.head_count")),
                "qk_norm": any(t[0].endswith(".attn_q_norm.weight") for t in idx.tensors)}
        if view["expert_count"]:  # llama.cpp runs a shared expert where its tensors are (no count key)
            view["shared_expert"] = any(t[0].endswith(".ffn_up_shexp.weight") for t in idx.tensors)
    finally:
        idx.close()
    ids = tokenize_vocab_only(path, paragraphs + list(SPECIAL_TEXT), special=True)
    view["tokens"], view["special_ids"] = ids[: len(paragraphs)], ids[len(paragraphs):]
    return view


def _folder_tokenizer(folder: Path, paragraphs: list[str], view: dict) -> None:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:  # no or unreadable tokenizer files: a failed check, reported with the reason
        view["tokenizer_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
        return
    view["tokens"] = tok(paragraphs, add_special_tokens=False)["input_ids"]
    view["special_ids"] = tok(list(SPECIAL_TEXT), add_special_tokens=False)["input_ids"]
    view["template"] = getattr(tok, "chat_template", None)
    raw = folder / "tokenizer.json"
    if raw.is_file():  # read literally, as onnxruntime-genai and the tokenizers library do (transformers 5
        from tokenizers import Tokenizer  # rebuilds Qwen2's pre-tokenizer in code and ignores the file's)

        try:
            enc = Tokenizer.from_file(str(raw)).encode_batch(paragraphs, add_special_tokens=False)
            view["tokens_file"] = [e.ids for e in enc]
        except Exception as err:
            view["tokenizer_error"] = f"tokenizer.json: {type(err).__name__}: {str(err)[:120]}"


def onnx_view(path: Path, paragraphs: list[str]) -> dict[str, Any]:
    folder = path if path.is_dir() else path.parent
    genai = _read_json(folder / "genai_config.json").get("model") or {}
    cfg = _read_json(folder / "config.json")
    view = {"where": "genai_config.json, the shipped config.json and tokenizer files",
            **{k: v for k, v in hf_numbers(cfg).items() if cfg}, "bos": genai.get("bos_token_id"),
            "eos": genai.get("eos_token_id"), "pad": genai.get("pad_token_id")}
    if genai.get("context_length") is not None:
        view["context_length"] = genai["context_length"]
    if genai.get("vocab_size") is not None:
        view["vocab_size"] = genai["vocab_size"]
    _folder_tokenizer(folder, paragraphs, view)
    return view


def hf_view(path: Path, paragraphs: list[str]) -> dict[str, Any]:
    cfg, gen = _read_json(path / "config.json"), _read_json(path / "generation_config.json")
    view = {"where": "config.json, generation_config.json and tokenizer files", **hf_numbers(cfg),
            "vocab_size": cfg.get("vocab_size")}
    for kind in ("bos", "eos", "pad"):
        view[kind] = sorted(_ids(cfg.get(f"{kind}_token_id")) | _ids(gen.get(f"{kind}_token_id"))) or None
    _folder_tokenizer(path, paragraphs, view)
    return view


VIEWS: dict[str, Callable[[Path, list[str]], dict]] = {"gguf": gguf_view, "onnx": onnx_view, "hf": hf_view}


# ---- comparison ---------------------------------------------------------------------------------

def eval_paragraphs(data: str = "shipped") -> list[str]:
    from qwen_quant.calib.sources import load_eval_text

    text = "\n\n".join(d if isinstance(d, str) else "" for d in load_eval_text(data))
    paras = [p for p in text.split("\n\n") if p.strip()]
    return paras[:MAX_PARAGRAPHS]


def chat_samples() -> list[list[dict]]:
    from qwen_quant.calib.sources import shipped_calibration

    return [d for d in shipped_calibration() if isinstance(d, list)][:MAX_CHATS]


def _render(tok, template: str | None, chats: list[list[dict]]) -> list[str] | str:
    if not template:
        return "no chat template"
    try:
        return [tok.apply_chat_template(c, chat_template=template, tokenize=False, add_generation_prompt=True) for c in chats]
    except Exception as err:  # a template that raises on our samples renders nothing usable
        return f"rendering fails ({type(err).__name__}: {str(err)[:80]})"


def _tokenizer_checks(name: str, view: dict, ref_tok, paragraphs: list[str]) -> list[dict]:
    if "tokenizer_error" in view:
        return [_check("tokenizer", False, "the source's tokenizer", "unreadable", f"{name}: the tokenizer files do not "
                       f"load ({view['tokenizer_error']}); copy the source model's tokenizer files")]
    want = ref_tok(paragraphs, add_special_tokens=False)["input_ids"]
    out = []
    for check, key, how in (("tokenizer ids", "tokens", ""), ("tokenizer.json ids", "tokens_file", " (tokenizer.json read literally, as onnxruntime-genai does)")):
        if key not in view:
            continue
        diff = [i for i, (a, b) in enumerate(zip(view[key], want)) if list(a) != list(b)]
        out.append(_check(check, not diff, f"{len(paragraphs)} eval paragraphs as the source tokenizes them",
                          f"{len(diff)} differ" + (f" (pre-tokenizer {view['pre']})" if view.get("pre") else ""),
                          "" if not diff else f"{name}: {len(diff)} of {len(paragraphs)} eval paragraphs tokenize "
                          f"differently{how} from the source (first: {paragraphs[diff[0]][:30]!r}); ship the source's tokenizer"))
    for text, got in zip(SPECIAL_TEXT, view["special_ids"]):
        ref_id = ref_tok.convert_tokens_to_ids(text)
        if ref_id is None or ref_id == getattr(ref_tok, "unk_token_id", None):
            continue
        ok = list(got) == [ref_id]
        out.append(_check(f"{text} id", ok, [ref_id], list(got),
                          "" if ok else f"{name}: {text} is {list(got)} here but {ref_id} in the source; ship the source's tokenizer"))
    return out


def metadata_parity(artifact, reference, data: str = "shipped", ref_tok=None, engine: dict | None = None) -> dict[str, Any]:
    """``{ok, checks}`` for ``artifact`` against the HF checkpoint ``reference`` (see module docstring).

    ``ref_tok``: the source's tokenizer when already loaded (`run_eval` has it: the ids every backend is fed).
    ``engine``: what a serving engine parsed from the checkpoint (the vLLM backend's ``engine_view``:
    context length, rope, eps, bos/eos/pad ids); those values replace the ones read from the files.
    """
    from qwen_quant.models.loader import load_text_config, load_tokenizer, resolve_model

    p, ref = Path(artifact), resolve_model(reference)
    kind = artifact_kind(p)
    name = p.name
    paragraphs = eval_paragraphs(data)
    ref_tok = ref_tok or load_tokenizer(ref)
    ref_cfg = load_text_config(ref)
    view = VIEWS[kind](p, paragraphs)
    if engine and "error" not in engine:
        view["where"] = "what vLLM parsed (engine), tokenizer files"
        for k in ("context_length", "rope_theta", "rms_eps", "vocab_size", "bos", "eos", "pad"):
            if engine.get(k) is not None:
                view[k] = engine[k]
        if "rope_scaling" in engine:
            view["rope_scaling"] = _scaling(engine["rope_scaling"])
    where = view["where"]
    checks = _tokenizer_checks(name, view, ref_tok, paragraphs)

    specials = source_specials(ref, ref_tok)
    for k in ("bos", "eos", "pad"):
        got = _ids(view.get(k))
        if not got:
            continue
        ok = got <= specials[k] if specials[k] else True
        checks.append(_check(f"{k}_token_id", ok, sorted(specials[k]), sorted(got),
                             "" if ok else f"{name}: {k} token id {sorted(got)} in {where.split(',')[0]} is not one the "
                             f"source declares ({sorted(specials[k])}); re-export or fix the id"))

    checks += _table_checks(p, kind, name, ref)

    chats = chat_samples()
    if chats and "tokenizer_error" not in view:
        want = _render(ref_tok, ref_tok.chat_template, chats)
        sources = {"chat template": view.get("template")}  # what the runtime (or transformers) picks
        if kind != "gguf":
            from qwen_quant.validate.tables import templates

            folder = p if p.is_dir() else p.parent
            sources.update({f"chat template ({where_})": t for where_, t in templates(folder).items()})
        for check_name, template in sources.items():
            got = _render(ref_tok, template, chats)
            ok = want == got
            first = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), 0) if isinstance(want, list) and isinstance(got, list) else None
            actual = "same text" if ok else (got if isinstance(got, str) else f"chat sample {first} renders differently")
            checks.append(_check(check_name, ok, f"{len(chats)} shipped chats rendered as the source renders them", actual,
                                 "" if ok else f"{name}: the {check_name} {actual if isinstance(got, str) else 'differs'} "
                                 f"({actual}); ship the source's chat template"))

    want_nums = hf_numbers(ref_cfg)
    want_nums["vocab_size"] = ref_cfg.get("vocab_size")
    want_nums.update(hf_structure(ref_cfg))
    for key in ("context_length", "rope_theta", "rope_scaling", "rms_eps", "vocab_size", "expert_count",
                "expert_used_count", "expert_ff_length", "expert_shared_ff_length", "shared_expert", "head_dim",
                "qk_norm"):
        got, exp = view.get(key), want_nums.get(key)
        if got is None or exp is None:
            continue
        ok = _same(got, exp)
        checks.append(_check(key, ok, exp, got, "" if ok else f"{name}: {key} is {_short(got)} in {where.split(',')[0]} "
                             f"but {_short(exp)} in the source; the runtime would run another model, re-export it"))

    if kind == "hf" and (_read_json(p / "config.json").get("quantization_config") or {}).get("quant_method") == "gptq":
        from qwen_quant.formats.integrity import gidx_convention

        checks.append(gidx_convention(p, _read_json(p / "config.json")))
    return {"ok": all(c["ok"] for c in checks), "checks": checks, "read_from": where}


def _table_checks(p: Path, kind: str, name: str, ref: Path) -> list[dict]:
    """Whole tokenizer tables, flags, declared special tokens, generation defaults (`validate.tables`)."""
    from qwen_quant.validate import tables

    src = tables.SourceTables(ref)
    if kind == "gguf":
        from qwen_quant.formats.integrity import GGUFIndex

        idx = GGUFIndex(p)
        try:
            return tables.gguf_table_checks(name, idx, src)
        finally:
            idx.close()
    folder = p if p.is_dir() else p.parent
    return tables.hf_table_checks(name, folder, src) + tables.generation_checks(name, folder, src)


def _short(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(_plain(v))


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-5)  # GGUF stores eps/theta as float32
    return a == b


def failed_reasons(metadata: dict | None) -> list[str]:
    """One line per failed check (what `check` prints)."""
    if not metadata:
        return []
    return [c.get("reason") or f"{c['name']}: expected {c['expected']}, got {c['actual']}" for c in metadata.get("checks", [])
            if not c.get("ok")]
