"""conversion-report.json for a Qwen v1 conversion, and the one line `info`/`convert` print about its context limit.

Why a report at all: the converted model computes exactly what v1 computes only up to v1's
``seq_length``. Past it, two v1 inference tricks that qwen2 cannot express take over:

* dynamic NTK (``use_dynamic_ntk``) picks ``ntk_alpha = 2**ceil(log2(T/seq_length) + 1) - 1`` from
  the length T of the whole forward pass (3 up to 2x seq_length, 7 up to 4x, ...) and raises the
  rotary base to ``base * alpha**(d/(d-2))`` for *every* position of that pass, the first
  seq_length included. While decoding with a KV cache v1 keeps the alpha of the prefill, so a
  prompt that fit in seq_length keeps alpha 1 however long the generation runs.
* logN attention (``use_logn_attn``) multiplies the query at position i > seq_length by
  ``log(i)/log(seq_length)`` (1.05 at 3,000 for seq_length 2048, 1.09 at 4,100), in prefill and
  cached decoding alike; positions up to seq_length are never touched.

transformers' rope options cannot hold either: its "dynamic" rope type scales the base by
``(factor*T/max_position_embeddings - (factor-1))**(d/(d-2))``, a linear function of T, not v1's
step function (T = seq_length+1 gives ~1+1/seq_length there, 3 in v1), and no Qwen2 option scales
queries by position (the rope ``attention_factor`` is one constant for all positions). So the
converted model keeps a plain rope and caps its context at seq_length (max_position_embeddings,
the tokenizer's model_max_length), and this report says what a longer context would do instead,
with the effect measured on a random model against an independent v1 forward
(tests/test_convert_v1_edges.py::test_beyond_seq_length_measured; figures in README "Qwen v1").
"""

from __future__ import annotations

import math
from pathlib import Path

# tests/test_convert_v1_edges.py (slow): a random v1 model (head_dim 128, seq_length 2048) and a trained fixture
# written as v1 (seq_length 64, lengths scaled by 64/2048), against an independent v1 forward; tables in README.
MEASURED = ("against an independent v1 forward at 2049/3000/4100 tokens (README 'Qwen v1'): one longer prompt changed v1's top-1 "
            "at 3-6% of the first seq_length positions of a trained model (16-18% on a random one); after seq_length the "
            "converted model's perplexity was 4.93 vs v1's 4.45 at 1.5x and 4.99 vs 4.14 at 2x (trained fixture); generating "
            "past seq_length from a prompt that fit differs by logN only (top-1 97-100%)")

def beyond_limit(cfg: dict, seq: int) -> dict:
    """What v1 does differently once a context passes ``seq`` tokens, as stated in the report."""
    ntk, logn = bool(cfg.get("use_dynamic_ntk")), bool(cfg.get("use_logn_attn"))
    if not (ntk or logn):
        return {"differs": False, "summary": "no context-dependent v1 feature is enabled; v1 is plain rope at every length"}
    ntk_text = (f"v1 raises the rotary base (ntk_alpha {_alpha(seq + 1, seq)} up to {2 * seq} tokens, {_alpha(2 * seq + 1, seq)} "
                f"up to {4 * seq}) for every position of the pass, the first {seq} included")
    logn_text = (f"v1 scales the queries after position {seq} by log(i)/log({seq}) ({math.log(round(1.5 * seq), seq):.3f} at "
                 f"{round(1.5 * seq)}, {math.log(2 * seq + 4, seq):.3f} at {2 * seq + 4})")
    decode = [logn_text + "; earlier positions are unchanged"] if logn else []
    if ntk:
        decode.append("v1 keeps the prefill's ntk_alpha (1 for a prompt that fit), so its rotary embedding stays the converted model's")
    return {
        "differs": True,
        "prompt_longer_than_limit": "; ".join(t for t, on in ((ntk_text, ntk), (logn_text, logn)) if on)
                                    + ("" if ntk else "; earlier positions are unchanged"),
        "generation_past_limit_from_shorter_prompt": "; ".join(decode),
        "converted_model_past_limit": "plain rope with the fixed rope_theta (transformers does not stop at max_position_embeddings); "
                                      "not what v1 computes",
        "measured": MEASURED,
    }


def _alpha(T: int, seq: int) -> int:
    return max(2 ** math.ceil(math.log(T / seq, 2) + 1) - 1, 1)


def conversion_report(cfg: dict, seq: int, src: Path, files: list[Path], dtype: str, n: int, tok: dict, chat: bool,
                      dropped: list[str], renamed: dict[str, str]) -> dict:
    feats = []
    if cfg.get("use_dynamic_ntk"):
        feats.append({"name": "use_dynamic_ntk", "value": True, "switches_on_above_tokens": seq, "positions_affected": "all",
                      "effect": f"a forward pass over more than {seq} tokens raises v1's rotary base for every position, "
                                "the first seq_length included; qwen2 keeps rope_theta fixed"})
    if cfg.get("use_logn_attn"):
        feats.append({"name": "use_logn_attn", "value": True, "switches_on_above_tokens": seq, "positions_affected": f"after {seq}",
                      "effect": f"v1 scales the queries of positions after {seq} by log(i)/log({seq}); qwen2 does not"})
    if cfg.get("use_cache_quantization"):
        feats.append({"name": "use_cache_quantization", "value": True, "switches_on_above_tokens": 0, "positions_affected": "all",
                      "effect": "v1 stores its KV cache in int8; the converted model keeps it in the compute dtype"})
    names = " and ".join(f["name"] for f in feats if f["switches_on_above_tokens"])
    return {
        "source": str(src), "source_architecture": "QWenLMHeadModel", "target_architecture": "Qwen2ForCausalLM",
        "config_keys_renamed": renamed,
        "weight_files": [p.name for p in files], "tensors_written": n, "dtype": dtype,
        "features_not_represented": feats,
        "identical_up_to_tokens": seq,
        "identical_note": (f"outputs match v1 for contexts of at most {seq} tokens (seq_length); past it v1's {names} change "
                           "its outputs, see beyond_limit") if names else
                          "no context-dependent v1 feature is enabled; outputs match v1 at every length",
        "beyond_limit": beyond_limit(cfg, seq),
        "chat_format": "chatml" if chat else "raw",
        "generation_config_fields_dropped": dropped,
        "tokenizer": tok,
    }


def context_limit_line(report: dict) -> str:
    """One line for `qwen-quant info` / `convert`: the limit and what a longer context does in v1."""
    seq, b = report.get("identical_up_to_tokens"), report.get("beyond_limit") or {}
    if not b.get("differs", True):
        return f"converted from Qwen v1; identical to v1 at every length ({b.get('summary', '')})"
    first = "all positions" if any(f.get("positions_affected") == "all" for f in report.get("features_not_represented", [])) \
        else f"positions after {seq}"
    return (f"converted from Qwen v1: identical to v1 up to {seq} tokens; a longer prompt changes v1's outputs at {first} "
            f"(dynamic NTK / logN, not representable in qwen2), so keep contexts <= {seq}; see conversion-report.json")
