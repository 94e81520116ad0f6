"""qwen-quant convert: a tiny Qwen v1 checkpoint becomes a qwen2 checkpoint with the same logits and token ids.

The reference forward pass below is written from the published v1 architecture (modeling_qwen.py:
fused c_attn = [q;k;v] + bias, NeoX rotary with base rotary_emb_base, RMSNorm, causal softmax,
c_proj(w1(x) * silu(w2(x))), untied lm_head, dynamic NTK + logN past seq_length) and shares no code
with the converter.
"""

from __future__ import annotations

import base64
import json
import math
import unicodedata
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from qwen_quant.fixtures import tokenizer_dir
from qwen_quant.models.convert.qwen_v1 import REPORT_FILE, ConvertConfig, convert_qwen_v1, is_qwen_v1
from qwen_quant.errors import QuantError

QWEN2_TOKENIZER = tokenizer_dir() / "tokenizer.json"
N_RANKS = 2000
H, HEADS, LAYERS, FF, SEQ = 64, 4, 2, 96, 24
N_SPECIAL = 3 + 205
VOCAB = ((N_RANKS + N_SPECIAL + 127) // 128) * 128  # padded like the real 151936
PAT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
SAMPLE = ("Hello, World! It's 2024-05-17; we'll test   spaces\tand\nnewlines\r\n\n"
          "你好，世界！今天天气很好。 Ünïcödé café cafe\u0301 🎉\n"
          "def add(a, b):\n    return a + b  # 12345\n"
          "<|im_start|>user\nhi<|im_end|>\n<|extra_3|><|endoftext|>")


def _ranks() -> dict[bytes, int]:
    """The first N_RANKS tokens of the real Qwen2/Qwen v1 BPE (closed under merges by construction)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    dec = {c: b for b, c in bytes_to_unicode().items()}
    vocab = json.loads(QWEN2_TOKENIZER.read_text())["model"]["vocab"]
    return {bytes(dec[c] for c in s): i for s, i in vocab.items() if i < N_RANKS}


def _v1_weights(seed: int = 0, h: int = H, layers: int = LAYERS, ff: int = FF, vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def lin(o, i):
        return torch.randn(o, i, generator=g) / math.sqrt(i)

    def norm():
        return 1 + 0.1 * torch.randn(h, generator=g)

    w = {"transformer.wte.weight": torch.randn(vocab, h, generator=g), "transformer.ln_f.weight": norm(),
         "lm_head.weight": lin(vocab, h)}
    for i in range(layers):
        p = f"transformer.h.{i}."
        w |= {p + "ln_1.weight": norm(), p + "ln_2.weight": norm(),
              p + "attn.c_attn.weight": lin(3 * h, h), p + "attn.c_attn.bias": 0.2 * torch.randn(3 * h, generator=g),
              p + "attn.c_proj.weight": lin(h, h), p + "mlp.w1.weight": lin(ff, h), p + "mlp.w2.weight": lin(ff, h),
              p + "mlp.c_proj.weight": lin(h, ff)}
    return w


def _v1_config(**changes) -> dict:
    return {"architectures": ["QWenLMHeadModel"], "auto_map": {"AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
            "model_type": "qwen", "hidden_size": H, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
            "intermediate_size": 2 * FF, "kv_channels": H // HEADS, "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000,
            "rotary_pct": 1.0, "seq_length": SEQ, "max_position_embeddings": SEQ, "vocab_size": VOCAB, "no_bias": True,
            "use_dynamic_ntk": True, "use_logn_attn": True, "tie_word_embeddings": False, "bf16": False, "fp16": False,
            "fp32": False, "attn_dropout_prob": 0.0, "emb_dropout_prob": 0.0, "initializer_range": 0.02,
            "scale_attn_weights": True, "use_flash_attn": "auto", "tokenizer_class": "QWenTokenizer"} | changes


def _make_v1(folder: Path, weights: dict[str, torch.Tensor], ranks: dict[bytes, int], fmt: str = "safetensors",
             config: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config or _v1_config()))
    (folder / "generation_config.json").write_text(json.dumps(
        {"chat_format": "chatml", "eos_token_id": 151643, "pad_token_id": 151643, "max_window_size": 6144,
         "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.8, "repetition_penalty": 1.1}))
    (folder / "qwen.tiktoken").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    names = sorted(weights)
    halves = [dict((n, weights[n]) for n in names[: len(names) // 2]), dict((n, weights[n]) for n in names[len(names) // 2:])]
    for i, part in enumerate(halves, 1):
        if fmt == "safetensors":
            save_file(part, str(folder / f"model-{i:05d}-of-00002.safetensors"))
        else:
            torch.save(part, folder / f"pytorch_model-{i:05d}-of-00002.bin")
    return folder


def v1_reference_logits(w: dict[str, torch.Tensor], ids: torch.Tensor, dynamic: bool = True, *, ntk: bool | None = None,
                        logn: bool | None = None, heads: int = HEADS, seq: int = SEQ, base: float = 10000.0) -> torch.Tensor:
    """Qwen v1 forward in fp32, from the architecture description (not from the converter).

    One forward over the whole of ``ids``, as v1 runs a prompt: dynamic NTK picks ntk_alpha from the
    whole length T (so it rotates every position differently once T > seq) and logN scales the
    queries of positions after ``seq``. ``ntk``/``logn`` switch each off alone (``dynamic`` sets
    both); ntk=False, logn=True is what v1 computes while decoding with a KV cache from a prompt of at
    most ``seq`` tokens (it keeps the prefill's ntk_alpha, 1, for every later step).
    """
    ntk, logn = dynamic if ntk is None else ntk, dynamic if logn is None else logn
    T, h = ids.shape[1], w["transformer.wte.weight"].shape[1]
    hd, layers = h // heads, sum(k.endswith(".ln_1.weight") for k in w)

    def rms(x, wt):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * wt

    alpha = max(2 ** math.ceil(math.log(T / seq, 2) + 1) - 1, 1) if ntk else 1
    base = base * alpha ** (hd / (hd - 2))
    inv = 1.0 / base ** (torch.arange(0, hd, 2).float() / hd)
    emb = torch.cat([torch.outer(torch.arange(T).float(), inv)] * 2, -1)[None, :, None, :]
    cos, sin = emb.cos(), emb.sin()

    def rope(x):  # x: [B, T, heads, hd]; rotate_half on the two halves
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    logn_t = torch.tensor([math.log(i, seq) if i > seq else 1.0 for i in range(1, T + 1)])[None, :, None, None]
    x = w["transformer.wte.weight"][ids]
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(layers):
        p = f"transformer.h.{i}."
        y = rms(x, w[p + "ln_1.weight"])
        qkv = y @ w[p + "attn.c_attn.weight"].T + w[p + "attn.c_attn.bias"]
        q, k, v = (t.reshape(*t.shape[:2], heads, hd) for t in qkv.split(h, -1))
        q, k = rope(q), rope(k)
        if logn and T > seq:
            q = q * logn_t
        att = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)) / math.sqrt(hd)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        ctx = (att @ v.transpose(1, 2)).transpose(1, 2).reshape(*x.shape)
        x = x + ctx @ w[p + "attn.c_proj.weight"].T
        y = rms(x, w[p + "ln_2.weight"])
        a1, a2 = y @ w[p + "mlp.w1.weight"].T, y @ w[p + "mlp.w2.weight"].T
        x = x + (a1 * F.silu(a2)) @ w[p + "mlp.c_proj.weight"].T
    return rms(x, w["transformer.ln_f.weight"]) @ w["lm_head.weight"].T


@pytest.fixture(scope="module")
def ranks():
    return _ranks()


@pytest.fixture(scope="module")
def weights():
    return _v1_weights()


@pytest.fixture(scope="module")
def converted(tmp_path_factory, weights, ranks):
    root = tmp_path_factory.mktemp("conv")
    src = _make_v1(root / "qwen-v1", weights, ranks)
    out = convert_qwen_v1(ConvertConfig(model=src, output=root / "qwen2", max_shard_bytes=200_000))
    return src, out


def test_layout_config_and_report(converted):
    src, out = converted
    assert is_qwen_v1(src) and not is_qwen_v1(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert (cfg["intermediate_size"], cfg["num_key_value_heads"], cfg["max_position_embeddings"]) == (FF, HEADS, SEQ)
    assert cfg["rope_parameters"]["rope_theta"] == cfg["rope_theta"] == 10000.0 and cfg["tie_word_embeddings"] is False
    assert cfg["dtype"] == "float32" and cfg["vocab_size"] == VOCAB
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded output
    rep = json.loads((out / REPORT_FILE).read_text())
    assert {f["name"] for f in rep["features_not_represented"]} == {"use_dynamic_ntk", "use_logn_attn"}
    assert rep["identical_up_to_tokens"] == SEQ and rep["tokenizer"]["first_special_id"] == N_RANKS
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [N_RANKS + 2, N_RANKS + 1, N_RANKS] and gen["top_p"] == 0.8
    assert "stop_words_ids" not in gen and "chat_format" in rep["generation_config_fields_dropped"]
    assert not list(out.parent.glob(".qwen2.tmp-*"))


def test_logits_match_v1_reference(converted, weights):
    from transformers import Qwen2ForCausalLM

    _, out = converted
    model = Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, N_RANKS + N_SPECIAL, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for T in (1, 7, SEQ):  # every context up to seq_length
            got = model(ids[:, :T]).logits
            ref = v1_reference_logits(weights, ids[:, :T])
            assert ref.std() > 1.0  # non-trivial logits
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        # Past seq_length v1's dynamic NTK + logN change its outputs; the report's limit is real.
        long = torch.randint(0, N_RANKS, (1, SEQ + 8), generator=torch.Generator().manual_seed(2))
        got = model(long).logits
        torch.testing.assert_close(got, v1_reference_logits(weights, long, dynamic=False), rtol=1e-5, atol=1e-5)
        assert (got - v1_reference_logits(weights, long)).abs().max() > 1e-2


def test_tokenizer_ids_match_tiktoken(converted, ranks):
    import tiktoken
    from transformers import AutoTokenizer

    _, out = converted
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
    enc = tiktoken.Encoding("qwen-test", pat_str=PAT, mergeable_ranks=ranks,
                            special_tokens={t: N_RANKS + i for i, t in enumerate(specials)})
    tok = AutoTokenizer.from_pretrained(out)
    for text in (SAMPLE, SAMPLE.upper(), " leading space  and trailing  ", "x" * 50 + "1234567890"):
        want = enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")
        assert tok(text)["input_ids"] == want
        assert tok.decode(want) == unicodedata.normalize("NFC", text)
    assert [tok.convert_tokens_to_ids(t) for t in specials] == list(range(N_RANKS, N_RANKS + len(specials)))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    msgs = [{"role": "user", "content": "你好"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"


def test_pickle_needs_flag_and_then_matches(tmp_path, weights, ranks, converted):
    src = _make_v1(tmp_path / "v1bin", weights, ranks, fmt="bin")
    with pytest.raises(QuantError, match="--allow-pickle"):
        convert_qwen_v1(ConvertConfig(model=src, output=tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    out = convert_qwen_v1(ConvertConfig(model=src, output=tmp_path / "out", allow_pickle=True))
    from safetensors.torch import load_file

    got = load_file(out / "model.safetensors")
    ref = {}
    for p in converted[1].glob("model-*.safetensors"):
        ref |= load_file(p)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_bf16_kept_and_copied_bit_exact(tmp_path, weights, ranks):
    from safetensors.torch import load_file

    w16 = {k: v.to(torch.bfloat16) for k, v in weights.items()}
    out = convert_qwen_v1(ConvertConfig(model=_make_v1(tmp_path / "v1", w16, ranks), output=tmp_path / "out"))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    got, p = load_file(out / "model.safetensors"), "transformer.h.1."
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    _, k, v = w16[p + "attn.c_attn.weight"].split(H)
    assert torch.equal(got["model.layers.1.self_attn.k_proj.weight"], k) and torch.equal(got["model.layers.1.self_attn.v_proj.weight"], v)
    assert torch.equal(got["model.layers.1.self_attn.q_proj.bias"], w16[p + "attn.c_attn.bias"][:H])
    assert torch.equal(got["model.layers.1.mlp.gate_proj.weight"], w16[p + "mlp.w2.weight"])
    assert torch.equal(got["model.layers.1.mlp.up_proj.weight"], w16[p + "mlp.w1.weight"])
    assert torch.equal(got["model.layers.1.self_attn.o_proj.weight"], w16[p + "attn.c_proj.weight"])

def test_refuses_non_v1_and_existing_output(tmp_path, converted):
    src, out = converted
    with pytest.raises(QuantError, match="not a Qwen v1"):
        convert_qwen_v1(ConvertConfig(model=out, output=tmp_path / "x"))
    with pytest.raises(QuantError, match="--force"):
        convert_qwen_v1(ConvertConfig(model=src, output=out))
    target = tmp_path / "existing"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    convert_qwen_v1(ConvertConfig(model=src, output=target, force=True))
    assert (target / "config.json").is_file() and not (target / "stale.txt").exists()



def test_cli_convert_json_and_errors(tmp_path, converted):
    from typer.testing import CliRunner

    from cli import app

    src, _ = converted
    out, report = tmp_path / "q2", tmp_path / "r.json"
    res = CliRunner().invoke(app, ["convert", str(src), "-o", str(out), "--json", str(report), "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads(report.read_text())["output"] == str(out) and (out / "model.safetensors").is_file()
    res = CliRunner().invoke(app, ["convert", str(src), "-o", str(out), "-q"])
    assert isinstance(res.exception, QuantError) and "--force" in str(res.exception)  # main() maps it to exit code 2


@pytest.mark.slow
def test_full_vocabulary_matches_tiktoken(tmp_path):
    """The real 151,643-token vocabulary, through AutoTokenizer (transformers 5 rebuilds a Qwen2Tokenizer)."""
    import random

    from transformers import AutoTokenizer

    from qwen_quant.models.convert import tiktoken_tok

    global N_RANKS
    full = 151643
    saved, N_RANKS = N_RANKS, full
    try:
        ranks = _ranks()
    finally:
        N_RANKS = saved
    (tmp_path / "qwen.tiktoken").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    tiktoken_tok.write_tokenizer(tmp_path, tmp_path, chat=True, model_max_length=8192)
    tok, enc = AutoTokenizer.from_pretrained(tmp_path), tiktoken_tok.tiktoken_encoding(ranks)
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645 and tok.convert_tokens_to_ids("<|extra_204|>") == 151850
    inp = QWEN2_TOKENIZER.with_name("ggml-vocab-qwen2.gguf.inp").read_text().split("\n__ggml_vocab_test__\n")
    rng = random.Random(0)
    alphabet = [chr(c) for r in ((32, 127), (0x4E00, 0x4F00), (0xA0, 0x250), (0x1F300, 0x1F320), (0x400, 0x450)) for c in range(*r)]
    alphabet += [" ", "  ", "\n", "\t", "\r\n", "<|im_start|>", "<|endoftext|>"]
    words = [t.decode("utf-8", "ignore") for t in list(ranks)[::50]]
    rand = ["".join(rng.choice(words) if rng.random() < 0.5 else rng.choice(alphabet) for _ in range(40)) for _ in range(2000)]
    for text in inp + [SAMPLE] + rand:
        assert tok(text)["input_ids"] == enc.encode(unicodedata.normalize("NFC", text), allowed_special="all"), repr(text)
