"""Qwen v1's ``qwen.tiktoken`` vocabulary as a Hugging Face fast tokenizer with the same ids.

Qwen v1 ships a remote-code tokenizer (tokenization_qwen.py) over ``tiktoken``: byte-level BPE
ranks, one pre-tokenizer regex, NFC normalisation of the input text, and 208 special tokens
(``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ``<|extra_0..204|>``) numbered right after
the last rank. Everything downstream (llama.cpp, onnxruntime-genai, our validators) wants a
``tokenizer.json`` instead, so we rebuild one:

* merges come from transformers' ``TikTokenConverter``: a merge ``(l, r)`` for every split of a
  token whose halves are tokens, ordered by the rank of the result, which is tiktoken's rule
  (merge the adjacent pair whose concatenation has the lowest rank); ``ignore_merges=True`` adds
  tiktoken's whole-word shortcut. (llama.cpp's convert script keeps only the split tiktoken itself
  would make; both give the same ids on everything we tested.)
* we read the ranks file ourselves because ``tiktoken.load`` caches files by *path* in a temp dir
  and would serve a stale vocabulary when a file at the same path changes;
* ``tokenizer_class`` is ``Qwen2Tokenizer``, the class transformers 5 picks for a qwen2 folder
  anyway: it rebuilds the pipeline from our vocab + merges without ``ignore_merges``. That is
  still exact for this vocabulary: every one of the 151,643 real tokens is reachable by merges, and
  20,000 random mixed-script texts (1.3 M chars) tokenized identically to tiktoken either way
  (checked while writing this; tests/test_convert.py re-checks a sample with the full vocabulary).

Where we keep the Hugging Face behaviour instead of v1's (each pinned by tests/test_convert_v1_edges.py):

* **Specials are split before NFC.** v1 NFC-normalises the whole string and then lets tiktoken find
  special tokens; tokenizer.json finds them first and normalises the pieces between. The two differ
  only when normalisation reaches across a special token's edge: NFC composes '>' + U+0338 into
  '≯', so v1 reads ``<|im_end|>\u0338`` as plain text while we keep ``<|im_end|>``. Matching v1
  would take ``normalized: true`` special tokens, while llama.cpp's tokenizer splits special tokens
  before anything else whatever tokenizer.json says; all our backends agreeing on the ids matters
  more than this input.
* **The chat template is text, tokenized whole.** v1's ``make_context`` tokenizes role, ``\n`` and
  content apart and encodes special-token text inside content as plain text (``allowed_special=set()``).
  A Jinja template can do neither: its output is one string for the tokenizer. So content starting
  with whitespace that holds a newline (``"\nhi"``: the two newlines merge into one token) and
  content containing ``<|im_start|>``/``<|im_end|>`` (they become control tokens, as in every HF
  ChatML template, Qwen1.5/2 included) get other ids than in v1; the text is the same. Callers that
  pass untrusted text should strip special-token strings, as with any HF chat model.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from qwen_quant.errors import QuantError

TIKTOKEN_FILE = "qwen.tiktoken"
# tokenization_qwen.PAT_STR; note \p{N} (one digit per piece), unlike cl100k's \p{N}{1,3}.
PAT_STR = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
ENDOFTEXT, IMSTART, IMEND = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IMSTART, IMEND) + tuple(f"<|extra_{i}|>" for i in range(205))

# ChatML as Qwen-7B-Chat's make_context() builds it (default system prompt included).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def load_ranks(path: Path) -> dict[bytes, int]:
    """Parse ``base64(token) rank`` lines, as tokenization_qwen._load_tiktoken_bpe does."""
    ranks: dict[bytes, int] = {}
    try:
        for n, line in enumerate(Path(path).read_bytes().splitlines(), 1):
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    except (ValueError, OSError) as err:
        raise QuantError(f"{path} line {n}: not a tiktoken ranks file ({err}); pass the original Qwen v1 qwen.tiktoken") from err
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise QuantError(f"{path} lacks {len(missing)} of the 256 single-byte tokens; pass the original Qwen v1 qwen.tiktoken")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise QuantError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps or repeats; pass the original Qwen v1 qwen.tiktoken")
    return ranks


def special_ids(ranks: dict[bytes, int]) -> dict[str, int]:
    """Specials numbered right after the ranks (151643.. for the real vocabulary)."""
    return {tok: len(ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}


def tiktoken_encoding(ranks: dict[bytes, int]):
    """The reference: the same ``tiktoken.Encoding`` Qwen v1's own tokenizer builds."""
    import tiktoken

    return tiktoken.Encoding("Qwen", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=special_ids(ranks))


def build_fast_tokenizer(ranks: dict[bytes, int]):
    """A ``tokenizers.Tokenizer`` whose ids equal tiktoken's for every text and special token."""
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(_unused: str) -> dict[bytes, int]:
            return ranks

    tok = _Converter(vocab_file="<ranks>", pattern=PAT_STR, extra_special_tokens=list(SPECIAL_TOKENS)).converted()
    tok.normalizer = normalizers.NFC()  # QWenTokenizer.tokenize() NFC-normalises before tiktoken
    want = special_ids(ranks)
    got = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    if got != want or tok.get_vocab_size(with_added_tokens=True) != len(ranks) + len(SPECIAL_TOKENS):
        raise QuantError("rebuilt tokenizer numbers its special tokens differently from Qwen v1; the ranks file looks modified")
    return tok


def write_tokenizer(src_dir: Path, out_dir: Path, *, chat: bool, model_max_length: int) -> dict:
    """Write tokenizer.json + tokenizer_config.json (+ chat_template.jinja); return a summary for the report."""
    ranks = load_ranks(Path(src_dir) / TIKTOKEN_FILE)
    tok = build_fast_tokenizer(ranks)
    tok.save(str(out_dir / "tokenizer.json"))
    specials = special_ids(ranks)
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for t, i in specials.items()}
    cfg = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": IMEND if chat else ENDOFTEXT,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return {"ranks": len(ranks), "special_tokens": len(specials), "first_special_id": len(ranks),
            "eos_token": cfg["eos_token"], "normalizer": "NFC", "pattern": PAT_STR}
