"""Turn documents into token tensors: calibration windows, evaluation stream, parity prompts.

Packing (hand-written because it is ten lines and must be bit-for-bit reproducible across
library versions): documents are shuffled with ``seed``, tokenized without special tokens,
joined into one stream with ``<|endoftext|>`` between documents (how Qwen was pretrained on
packed text), cut into non-overlapping ``seqlen`` windows, and ``nsamples`` distinct windows
are drawn with the same seed. So every sample is exactly ``seqlen`` real tokens, no padding,
and a source suffices exactly when it holds ``nsamples * seqlen`` tokens.

A shorter source (the shipped text holds ~247k tokens; peers' usual 512 x 2048 needs 1M) is
repeated: further passes over the same documents, each shuffled with a derived seed, are appended
until the stream holds ``nsamples * seqlen`` tokens, and windows are drawn from that longer stream
as above. Every window is still ``seqlen`` real tokens; text recurs across windows, in new
neighbourhoods and at new offsets (what GPTQ/AWQ tools do when they cycle a small dataset). Streams
that already suffice are unchanged. A source shorter than one window, or one that would have to be
repeated more than ``MAX_PASSES`` (16) times, is an error.

Chat samples: with ``chat=True`` they are rendered with ``tokenizer.apply_chat_template`` (what
an instruct model sees at inference). With ``chat=False`` (base models) they become plain
``role: content`` lines, so a base model is calibrated on the words, not on markup it was never
trained to use.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Union

import numpy as np
import torch

from qwen_quant.errors import QuantError

from .sources import Document, load_documents, load_eval_text, shipped_calibration, shipped_dir

SEPARATOR_TOKEN = "<|endoftext|>"
MAX_PASSES = 16  # a source repeated more often than this is too small for the request (an error)


def render_chatml(messages: list[dict]) -> str:
    """ChatML markup as literal text, without the template's default system prompt."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def render_plain(messages: list[dict]) -> str:
    """``role: content`` lines for base models."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def render_document(tokenizer, doc: Document, chat: bool) -> str:
    if isinstance(doc, str):
        return doc
    if not chat:
        return render_plain(doc)
    if not getattr(tokenizer, "chat_template", None):
        raise QuantError("the tokenizer has no chat template, so chat samples cannot be "
                         "rendered; drop --chat for this (base) model")
    return tokenizer.apply_chat_template(doc, tokenize=False)


def _encode_many(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _separator_id(tokenizer) -> int | None:
    tid = tokenizer.convert_tokens_to_ids(SEPARATOR_TOKEN)
    if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None):
        return tid
    return tokenizer.eos_token_id


def _join(encoded: list[list[int]], order: list[int], sep: int | None) -> np.ndarray:
    stream: list[int] = []
    for i in order:
        ids = encoded[i]
        if not ids:
            continue
        if stream and sep is not None:
            stream.append(sep)
        stream.extend(ids)
    return np.asarray(stream, dtype=np.int64)


def _shuffled(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def pack_stream(tokenizer, docs: list[Document], seed: int, chat: bool, min_tokens: int = 0) -> np.ndarray:
    return _pack(tokenizer, docs, seed, chat, min_tokens)[0]


def _pack(tokenizer, docs: list[Document], seed: int, chat: bool, min_tokens: int = 0) -> tuple[np.ndarray, int]:
    """Shuffle documents with ``seed`` and join their tokens with a separator (see module doc).

    ``min_tokens``: while the stream is shorter, append further passes over the same documents,
    pass ``k`` shuffled with seed ``seed * 1000003 + k``, so the same text recurs in new
    neighbourhoods and at new window offsets. Documents are tokenized once, whatever the passes.
    """
    encoded = _encode_many(tokenizer, [render_document(tokenizer, d, chat) for d in docs])
    sep = _separator_id(tokenizer)
    stream = _join(encoded, _shuffled(len(docs), seed), sep)
    passes, k = [stream], 1
    total = stream.size
    if min_tokens > MAX_PASSES * stream.size:
        min_tokens = 0  # too small to repeat: the caller reports it
    while total < min_tokens and stream.size:
        nxt = _join(encoded, _shuffled(len(docs), seed * 1_000_003 + k), sep)
        if sep is not None:
            nxt = np.concatenate([[sep], nxt])
        passes.append(nxt)
        total += nxt.size
        k += 1
    return (np.concatenate(passes) if len(passes) > 1 else stream), stream.size


def calibration_samples(tokenizer, source: Union[str, Path] = "shipped", nsamples: int = 128,
                        seqlen: int = 512, seed: int = 0, chat: bool = False) -> torch.Tensor:
    """``[nsamples, seqlen]`` int64 calibration windows, identical for identical arguments."""
    if nsamples < 1 or seqlen < 1:
        raise QuantError(f"nsamples and seqlen must be positive (got {nsamples}, {seqlen}); "
                         "fix --nsamples/--seqlen")
    need = nsamples * seqlen
    stream, once = _pack(tokenizer, load_documents(source), seed, chat, min_tokens=need)
    if stream.size < need:
        raise QuantError(f"not enough calibration tokens: have {once}, need {need} (more than {MAX_PASSES} "
                         "passes over the source); lower --nsamples/--seqlen or give a larger --calib")
    if once < seqlen:
        raise QuantError(f"not enough calibration tokens: {source} holds {once}, fewer than one "
                         f"--seqlen {seqlen} window; lower --seqlen or give a larger --calib")
    windows = stream.size // seqlen
    pick = np.random.default_rng(seed).choice(windows, size=nsamples, replace=False)
    rows = np.stack([stream[i * seqlen:(i + 1) * seqlen] for i in pick])
    return torch.from_numpy(rows)


def eval_tokens(tokenizer, source: Union[str, Path] = "shipped",
                max_tokens: int | None = None) -> np.ndarray:
    """Evaluation text as one int64 token stream (documents joined by blank lines), in file order."""
    docs = load_eval_text(source)
    text = "\n\n".join(render_document(tokenizer, d, chat=False) for d in docs)
    ids = np.asarray(_encode_many(tokenizer, [text])[0], dtype=np.int64)
    if ids.size == 0:
        raise QuantError(f"evaluation source {source} holds no tokens; give a file with text in it")
    return ids[:max_tokens] if max_tokens is not None else ids


def greedy_prompts(tokenizer) -> list[tuple[str, list[int]]]:
    """The shipped parity prompts as (text, token ids), in file order."""
    with open(shipped_dir() / "prompts.jsonl", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    texts = [r["text"] for r in rows]
    return list(zip(texts, _encode_many(tokenizer, texts)))


def training_texts() -> list[str]:
    """Calibration texts with chats as literal ChatML, for training the tiny fixture models.

    Only calib.jsonl is used; eval.txt stays unseen so fixture perplexities mean something.
    """
    return [d if isinstance(d, str) else render_chatml(d) for d in shipped_calibration()]


def dataset_fingerprint(tokens) -> str:
    """sha256 (hex) of the tokens as int32 little-endian bytes: names the exact data in reports."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens)
    if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
        raise QuantError("token ids do not fit in int32; this is not a token tensor")
    return hashlib.sha256(arr.astype("<i4").tobytes()).hexdigest()
