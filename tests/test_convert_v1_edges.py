"""Qwen v1 edges of `qwen-quant convert`: launch-era config keys, the context limit, tokenizer/template choices.

Each test pins one documented choice (README "Qwen v1"), so a change of behaviour fails here.
The v1 references (forward pass, ``make_context``) come from tests/test_convert.py and share no code
with the converter.
"""

from __future__ import annotations

import json
import math
import unicodedata
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_convert import N_RANKS, SEQ, _make_v1, _v1_config, ranks, v1_reference_logits, weights  # noqa: F401 (fixtures)

from qwen_quant.models.convert import tiktoken_tok
from qwen_quant.models.convert.qwen_v1 import REPORT_FILE, ConvertConfig, convert_qwen_v1
from qwen_quant.errors import QuantError

# Qwen-7B's config.json as first published (August 2023), keys that differ from the later release.
LAUNCH_ERA = {"n_embd": "hidden_size", "n_head": "num_attention_heads", "n_layer": "num_hidden_layers",
              "ffn_hidden_size": "intermediate_size", "n_positions": "max_position_embeddings"}
LAUNCH_EXTRAS = {"padded_vocab_size": None, "apply_residual_connection_post_layernorm": False, "bias_dropout_fusion": True,
                 "embd_pdrop": 0.0, "attn_pdrop": 0.0, "resid_pdrop": 0.1, "n_inner": None, "onnx_safe": None,
                 "params_dtype": "torch.bfloat16", "pos_emb": "rotary", "tokenizer_type": "QWenTokenizer"}


def _launch_era_config() -> dict:
    cfg = _v1_config()
    for old, new in LAUNCH_ERA.items():
        cfg[old] = cfg.pop(new)
    for key in ("attn_dropout_prob", "emb_dropout_prob", "tokenizer_class"):
        cfg.pop(key)
    return cfg | LAUNCH_EXTRAS | {"padded_vocab_size": cfg["vocab_size"]}


@pytest.fixture(scope="module")
def modern(tmp_path_factory, weights, ranks):
    root = tmp_path_factory.mktemp("modern")
    return convert_qwen_v1(ConvertConfig(model=_make_v1(root / "v1", weights, ranks), output=root / "out"))


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for p in sorted(folder.glob("*.safetensors")):
        out |= load_file(p)
    return out


def test_launch_era_keys_give_the_same_checkpoint(tmp_path, weights, ranks, modern):
    src = _make_v1(tmp_path / "v1-aug2023", weights, ranks, config=_launch_era_config())
    assert "hidden_size" not in json.loads((src / "config.json").read_text())
    out = convert_qwen_v1(ConvertConfig(model=src, output=tmp_path / "out"))
    got, want = _tensors(out), _tensors(modern)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (modern / name).read_bytes(), name
    rep, rep0 = (json.loads((p / REPORT_FILE).read_text()) for p in (out, modern))
    assert rep["config_keys_renamed"] == dict(LAUNCH_ERA, padded_vocab_size="vocab_size") and rep0["config_keys_renamed"] == {}


@pytest.mark.parametrize("change, match", [
    ({"drop": "n_embd"}, r"no integer 'hidden_size' \(or its launch-era name 'n_embd'\)"),
    ({"set": {"padded_vocab_size": 4096}}, "padded_vocab_size=4096 and vocab_size="),
    ({"set": {"apply_residual_connection_post_layernorm": True}}, "apply_residual_connection_post_layernorm=True"),
    ({"set": {"scale_attn_weights": False}}, "unscaled attention scores"),
])
def test_launch_era_config_refusals_are_one_line_exit_2(tmp_path, weights, ranks, change, match, capsys):
    """Bad or incomplete configs: `qwen-quant convert` exits 2 with one line naming the key and the fix."""
    import re

    from typer.testing import CliRunner

    from cli import app, main

    cfg = _launch_era_config()
    cfg.pop(change.get("drop", ""), None)
    cfg |= change.get("set", {})
    src = _make_v1(tmp_path / "v1", {"lm_head.weight": weights["lm_head.weight"]}, ranks, config=cfg)
    res = CliRunner().invoke(app, ["convert", str(src), "-o", str(tmp_path / "out"), "-q"])
    err = res.exception
    assert isinstance(err, QuantError) and re.search(match, str(err)) and "\n" not in str(err), res.output
    assert str(src) in str(err) and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exit_info:  # main() is the console script: QuantError -> one line, exit 2
        import sys

        argv, sys.argv = sys.argv, ["qwen-quant", "convert", str(src), "-o", str(tmp_path / "out"), "-q"]
        try:
            main()
        finally:
            sys.argv = argv
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(match, lines[0])




def test_report_and_info_state_what_a_longer_context_changes(modern, weights):
    """The report's claims, checked at the tiny scale (seq_length 24) against the v1 reference."""
    from transformers import Qwen2ForCausalLM
    from typer.testing import CliRunner

    from cli import app

    rep = json.loads((modern / REPORT_FILE).read_text())
    feats = {f["name"]: f for f in rep["features_not_represented"]}
    assert feats["use_dynamic_ntk"]["positions_affected"] == "all" and feats["use_logn_attn"]["positions_affected"] == f"after {SEQ}"
    assert "acts_beyond_tokens" not in json.dumps(rep)
    b = rep["beyond_limit"]
    assert f"the first {SEQ} included" in b["prompt_longer_than_limit"] and "ntk_alpha 3 up to 48 tokens, 7 up to 96" in b["prompt_longer_than_limit"]
    assert "keeps the prefill's ntk_alpha" in b["generation_past_limit_from_shorter_prompt"]
    model = Qwen2ForCausalLM.from_pretrained(modern, dtype=torch.float32).eval()
    ids = torch.randint(0, N_RANKS, (1, SEQ + 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = model(ids).logits
        prompt = v1_reference_logits(weights, ids)  # one forward: NTK from the whole length, logN after SEQ
        decode = v1_reference_logits(weights, ids, ntk=False, logn=True)  # cached decoding from a prompt that fit
    assert (got[:, :SEQ] - prompt[:, :SEQ]).abs().max() > 1e-2  # every position changes, not only the later ones
    torch.testing.assert_close(got[:, :SEQ], decode[:, :SEQ], rtol=1e-5, atol=1e-5)
    assert (got[:, SEQ:] - decode[:, SEQ:]).abs().max() > 1e-3
    res = CliRunner().invoke(app, ["info", str(modern), "--json"])
    assert res.exit_code == 0, res.output
    line = json.loads(res.output)["context_limit"]
    assert f"identical to v1 up to {SEQ} tokens" in line and "all positions" in line



def test_report_text_follows_the_enabled_features():
    from qwen_quant.models.convert.v1_report import beyond_limit, context_limit_line, conversion_report

    def rep(**cfg):
        return conversion_report(cfg, 2048, Path("src"), [], "float32", 0, {}, True, [], {})

    only_logn = rep(use_logn_attn=True)
    b = only_logn["beyond_limit"]
    assert "ntk_alpha" not in b["prompt_longer_than_limit"] and "earlier positions are unchanged" in b["prompt_longer_than_limit"]
    assert "1.053 at 3072, 1.091 at 4100" in b["prompt_longer_than_limit"]
    assert "at positions after 2048" in context_limit_line(only_logn)
    both = rep(use_dynamic_ntk=True, use_logn_attn=True)["beyond_limit"]["prompt_longer_than_limit"]
    assert "ntk_alpha 3 up to 4096 tokens, 7 up to 8192" in both and "unchanged" not in both
    assert beyond_limit({}, 8192)["differs"] is False and "every length" in context_limit_line(rep())


# --- Tokenizer and chat template: the HF behaviour is kept (README "Qwen v1" says why) ------------------
SYSTEM = "You are a helpful assistant."


def _v1_encoder(ranks):
    import tiktoken

    return tiktoken.Encoding("qwen-v1", pat_str=tiktoken_tok.PAT_STR, mergeable_ranks=ranks,
                             special_tokens=tiktoken_tok.special_ids(ranks))


def v1_make_context(enc, query: str, system: str = SYSTEM) -> list[int]:
    """Qwen-7B-Chat's qwen_generation_utils.make_context (chatml, no history), ids only.

    QWenTokenizer.encode NFC-normalises, then tiktoken; ``allowed_special=set()`` (with the default
    ``disallowed_special=()``) makes special-token text in role/content plain text. Role, the newline
    and content are tokenized apart and concatenated.
    """
    def text(s: str) -> list[int]:
        return enc.encode(unicodedata.normalize("NFC", s), allowed_special=set(), disallowed_special=())

    im_start, im_end, nl = enc.encode_single_token(tiktoken_tok.IMSTART), enc.encode_single_token(tiktoken_tok.IMEND), text("\n")

    def part(role: str, content: str) -> list[int]:
        return text(role) + nl + text(content)

    return ([im_start] + part("system", system) + [im_end] + nl + [im_start] + part("user", query) + [im_end] + nl
            + [im_start] + text("assistant") + nl)


@pytest.fixture(scope="module")
def hf_tok(modern):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(modern)


def _template_ids(tok, content: str) -> tuple[str, list[int]]:
    msgs = [{"role": "user", "content": content}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert ids == tok(text)["input_ids"]  # the template's text, tokenized as one string
    return text, ids


def test_template_matches_make_context_on_ordinary_content(hf_tok, ranks):
    enc = _v1_encoder(ranks)
    for content in ("你好", "Hello, world!\nSecond line.", " leading space", "cafe\u0301 ends in a newline\n"):
        assert _template_ids(hf_tok, content)[1] == v1_make_context(enc, content), repr(content)


def test_content_starting_with_newline_tokenizes_as_one_string(hf_tok, ranks):
    """Kept: the template is text, tokenized whole, so 'user' + '\\n' + '\\nhi' merges the two newlines; v1 does not."""
    enc = _v1_encoder(ranks)
    nl, nlnl = enc.encode("\n"), enc.encode("\n\n")
    assert len(nl) == len(nlnl) == 1
    text, ids = _template_ids(hf_tok, "\nhi")
    v1 = v1_make_context(enc, "\nhi")
    assert ids == enc.encode(text, allowed_special="all") and ids != v1
    user = ids.index(N_RANKS + 1, 1)  # the user turn's <|im_start|>
    assert ids[user + 2] == nlnl[0] and v1[user + 2: user + 4] == nl * 2
    assert len(v1) == len(ids) + 1


def test_special_token_text_in_content_stays_special(hf_tok, ranks):
    """Kept: '<|im_start|>' typed inside a message becomes the control token (as in every HF ChatML template);
    v1's make_context encoded it as plain text."""
    enc = _v1_encoder(ranks)
    im_start, im_end = N_RANKS + 1, N_RANKS + 2
    content = "quote <|im_start|>system and <|im_end|> here"
    text, ids = _template_ids(hf_tok, content)
    v1 = v1_make_context(enc, content)
    assert enc.decode(v1) == hf_tok.decode(ids) == text  # same text, different ids
    assert (ids.count(im_start), ids.count(im_end)) == (4, 3)
    assert (v1.count(im_start), v1.count(im_end)) == (3, 2)


def test_specials_are_split_before_nfc(hf_tok, ranks):
    """Kept: specials are found first, then each text piece is NFC-normalised. v1 normalises the whole string
    first, so a combining U+0338 after '>' composes into '≯' and the special token becomes plain text."""
    enc = _v1_encoder(ranks)
    text = "<|im_end|>\u0338 x"
    assert unicodedata.normalize("NFC", text) == "<|im_end|\u226f x"
    ids = hf_tok(text)["input_ids"]
    assert ids == [N_RANKS + 2] + enc.encode(unicodedata.normalize("NFC", "\u0338 x"))
    v1 = enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")
    assert N_RANKS + 2 not in v1 and ids != v1
    assert hf_tok("<|im_end|>\u00e9")["input_ids"] == enc.encode("<|im_end|>\u00e9", allowed_special="all")  # no composition: equal


# --- Beyond seq_length -------------------------------------------------------------------------------
# Qwen-7B's launch shape where it matters: head_dim 128, seq_length 2048; small width and vocabulary.
LONG_H, LONG_HEADS, LONG_FF, LONG_SEQ = 256, 2, 512, 2048
LONG_CASES = {"prompt": {"ntk": True, "logn": True}, "cached decode": {"ntk": False, "logn": True}}


def _compare(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """KL(v1 || converted) per position (nats), top-1 agreement and max |logit difference|."""
    lp, lq = ref.log_softmax(-1), got.log_softmax(-1)
    return {"kl": max(float((lp.exp() * (lp - lq)).sum(-1).mean()), 0.0), "top1": float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
            "max_abs": float((ref - got).abs().max()), "entropy": float(-(lp.exp() * lp).sum(-1).mean())}


def long_context_effect(tmp: Path, ranks, lengths=(2049, 3000, 4100), seq: int = LONG_SEQ, seed: int = 3) -> list[dict]:
    """The converted model run past its cap vs the v1 reference, on positions <= seq and > seq.

    "prompt": one forward over all T tokens, as v1 prefills a prompt (dynamic NTK from T, logN).
    "cached decode": v1 decoding past seq from a prompt that fit (it keeps the prefill's ntk_alpha 1,
    so only logN differs). Random weights: the sizes are this model's, the pattern is v1's.
    """
    from test_convert import VOCAB, _v1_weights
    from transformers import Qwen2ForCausalLM

    w = _v1_weights(seed, h=LONG_H, ff=LONG_FF)
    cfg = _v1_config(hidden_size=LONG_H, num_attention_heads=LONG_HEADS, kv_channels=LONG_H // LONG_HEADS,
                     intermediate_size=2 * LONG_FF, seq_length=seq, max_position_embeddings=seq)
    out = convert_qwen_v1(ConvertConfig(model=_make_v1(tmp / f"v1-{seq}", w, ranks, config=cfg), output=tmp / f"q2-{seq}"))
    model = Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    rows = []
    with torch.no_grad():
        for T in lengths:
            ids = torch.randint(0, min(N_RANKS, VOCAB), (1, T), generator=torch.Generator().manual_seed(T))
            got = model(ids).logits[0]
            plain = v1_reference_logits(w, ids, ntk=False, logn=False, heads=LONG_HEADS, seq=seq)[0]
            torch.testing.assert_close(got, plain, rtol=1e-4, atol=1e-4)  # past its cap the converted model is plain rope
            alpha = max(2 ** math.ceil(math.log(T / seq, 2) + 1) - 1, 1)
            for case, kw in LONG_CASES.items():
                ref = v1_reference_logits(w, ids, heads=LONG_HEADS, seq=seq, **kw)[0]
                rows.append({"tokens": T, "case": case, "ntk_alpha": alpha if kw["ntk"] else 1, "logn_last": math.log(T, seq),
                             "first": _compare(ref[:seq], got[:seq]), "later": _compare(ref[seq:], got[seq:])})
    return rows


@pytest.mark.slow
def test_beyond_seq_length_measured(tmp_path, ranks):
    """The figures in README "Qwen v1": what a context past seq_length does differently in v1 (run with -s to print)."""
    rows = long_context_effect(tmp_path, ranks)
    print("\n| tokens | v1 case | ntk_alpha | positions 1..2048: KL / top-1 / max abs | positions 2049..: KL / top-1 / max abs |")
    print("|---|---|---|---|---|")
    for r in rows:
        f, l_ = r["first"], r["later"]
        print(f"| {r['tokens']} | {r['case']} | {r['ntk_alpha']} | {f['kl']:.1e} / {f['top1']:.1%} / {f['max_abs']:.3f} "
              f"| {l_['kl']:.1e} / {l_['top1']:.1%} / {l_['max_abs']:.3f} |")
    print(f"v1 entropy, positions 1..2048: {rows[0]['first']['entropy']:.2f} nats")
    for r in rows:
        if r["case"] == "prompt":  # NTK rotates every position differently, the first seq_length included
            assert r["first"]["max_abs"] > 1e-2 and r["later"]["max_abs"] > 1e-2
        else:  # cached decoding keeps alpha 1: the first seq_length positions are untouched, logN changes the rest
            assert r["first"]["max_abs"] < 1e-4 and (r["tokens"] < 3000 or r["later"]["max_abs"] > 1e-2)


def trained_long_context_effect(tmp: Path, lengths=(65, 94, 129), seq: int = 64, windows: int = 8) -> list[dict]:
    """The same comparison on a trained model and real text: the untied MHA fixture (trained on 64-token
    windows, head_dim 32) written as Qwen v1 with seq_length 64, on the held-out eval text. 65/94/129
    are 2049/3000/4100 scaled by 64/2048 (same ntk_alpha: 3, 3, 7). Also gives each side's perplexity
    on the positions after seq, i.e. whether v1's tricks or plain rope extrapolate better here."""
    from test_recipe_run import qwen_v1_from
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from qwen_quant.calib.sources import shipped_dir
    from qwen_quant.fixtures import fixture_path

    fx = fixture_path("qwen2-tiny-untied", quiet=True)
    src = qwen_v1_from(fx, tmp / "v1-trained")
    cfg = json.loads((src / "config.json").read_text()) | {"seq_length": seq, "max_position_embeddings": seq}
    (src / "config.json").write_text(json.dumps(cfg))
    out = convert_qwen_v1(ConvertConfig(model=src, output=tmp / "q2-trained"))
    from safetensors.torch import load_file

    w = load_file(src / "model.safetensors")
    model = Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    stream = AutoTokenizer.from_pretrained(fx)((shipped_dir() / "eval.txt").read_text())["input_ids"]
    heads, base = cfg["num_attention_heads"], float(cfg["rotary_emb_base"])
    rows = []
    with torch.no_grad():
        for T in lengths:
            acc: dict = {}
            for i in range(windows):
                window = torch.tensor([stream[i * 600: i * 600 + T + 1]])
                ids, targets = window[:, :T], window[0, 1:]
                got = model(ids).logits[0]
                for case, kw in LONG_CASES.items():
                    ref = v1_reference_logits(w, ids, heads=heads, seq=seq, base=base, **kw)[0]
                    for span, sl in (("first", slice(0, seq)), ("later", slice(seq, T))):
                        c = _compare(ref[sl], got[sl])
                        tgt = targets[sl]
                        c["nll_v1"] = float(F.cross_entropy(ref[sl], tgt))
                        c["nll_converted"] = float(F.cross_entropy(got[sl], tgt))
                        for k, v in c.items():
                            acc.setdefault((case, span, k), []).append(v)
            for case, kw in LONG_CASES.items():
                row = {"tokens": T, "case": case, "ntk_alpha": max(2 ** math.ceil(math.log(T / seq, 2) + 1) - 1, 1) if kw["ntk"] else 1}
                for span in ("first", "later"):
                    row[span] = {k: sum(acc[(case, span, k)]) / windows for (c_, s_, k) in acc if (c_, s_) == (case, span)}
                    row[span]["max_abs"] = max(acc[(case, span, "max_abs")])
                rows.append(row)
    return rows


@pytest.mark.slow
def test_beyond_seq_length_trained_fixture(tmp_path):
    """README "Qwen v1" second table (run with -s to print)."""
    rows = trained_long_context_effect(tmp_path)
    print("\n| tokens | v1 case | ntk_alpha | positions 1..64: KL / top-1 / max abs | positions 65..: KL / top-1 / max abs "
          "| ppl 1..64: v1 / converted | ppl after 64: v1 / converted |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        f, l_ = r["first"], r["later"]
        print(f"| {r['tokens']} | {r['case']} | {r['ntk_alpha']} | {f['kl']:.1e} / {f['top1']:.1%} / {f['max_abs']:.3f} "
              f"| {l_['kl']:.1e} / {l_['top1']:.1%} / {l_['max_abs']:.3f} | {math.exp(f['nll_v1']):.2f} / {math.exp(f['nll_converted']):.2f} "
              f"| {math.exp(l_['nll_v1']):.2f} / {math.exp(l_['nll_converted']):.2f} |")
    for r in rows:
        if r["case"] == "prompt":
            assert r["first"]["max_abs"] > 1e-2
        else:
            assert r["first"]["max_abs"] < 1e-3
    print(f"v1 entropy, positions 1..64: {rows[0]['first']['entropy']:.2f} nats")
