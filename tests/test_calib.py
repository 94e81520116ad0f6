"""Tests for qwen_quant/calib and the shipped calib_data files (real Qwen2 tokenizer, < 30 s)."""

import hashlib
import json
import re
import sys
import types
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen_quant import calib
from qwen_quant.calib import (CalibConfig, calibration_samples, dataset_fingerprint,
                              default_tokenizer_dir, eval_tokens, greedy_prompts, training_texts)
from qwen_quant.errors import QuantError

DATA = Path(calib.__file__).resolve().parents[2] / "calib_data"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(default_tokenizer_dir()))


@pytest.fixture(scope="module")
def records():
    return [json.loads(line) for line in (DATA / "calib.jsonl").read_text("utf-8").splitlines()]


def _as_text(rec):
    return rec["text"] if "text" in rec else calib.render_chatml(rec["messages"])


def _pieces(text):
    return {p.strip() for p in text.split("\n\n") if p.strip()}


# ---------------------------------------------------------------- shipped files

def test_shipped_calib_schema_and_lengths(tok, records):
    assert len(records) >= 512
    assert len({r["id"] for r in records}) == len(records)
    assert {r["kind"] for r in records} == {"en", "zh", "code", "math", "chat"}
    for r in records:
        if r["kind"] == "chat":
            assert set(r) == {"id", "kind", "messages"}
            assert all(set(m) == {"role", "content"} for m in r["messages"])
            assert r["messages"][-1]["role"] == "assistant"
        else:
            assert set(r) == {"id", "kind", "text"}
    lengths = [len(ids) for ids in tok([_as_text(r) for r in records],
                                       add_special_tokens=False)["input_ids"]]
    assert all(150 <= n <= 600 for n in lengths), (min(lengths), max(lengths))


def test_shipped_eval_prompts_and_size(tok):
    assert len(eval_tokens(tok)) >= 45_000
    prompts = [json.loads(line) for line in (DATA / "prompts.jsonl").read_text("utf-8").splitlines()]
    assert len(prompts) == 12 and len({p["id"] for p in prompts}) == 12
    assert all(10 <= len(tok.encode(p["text"])) <= 40 for p in prompts)
    total = sum((DATA / f).stat().st_size for f in ("calib.jsonl", "eval.txt", "prompts.jsonl"))
    assert total < 2_000_000


def test_eval_disjoint_from_calibration(records):
    eval_text = (DATA / "eval.txt").read_text("utf-8")
    calib_pieces = set().union(*(_pieces(_as_text(r)) for r in records))
    assert not _pieces(eval_text) & calib_pieces
    assert not _pieces(eval_text) & {_as_text(r).strip() for r in records}
    assert not _pieces(eval_text) & set().union(*(_pieces(t) for t in training_texts()))


def test_math_answers_are_correct(records):
    """Every 'Solve for x' and shopping-change answer in the shipped data checks out."""
    text = "\n".join(_as_text(r) for r in records)
    solved = re.findall(r"Solve for x: (-?\d+)x ([+-]) (\d+) = (-?\d+)\.\n.*?Answer: x = (-?\d+)\.",
                        text, flags=re.S)
    assert len(solved) > 20
    for a, sign, b, c, x in solved:
        assert int(a) * int(x) + (int(b) if sign == "+" else -int(b)) == int(c)
    averages = re.findall(r"scored ([\d, ]+) on \d+ tests.*?Answer: (\d+(?:\.\d+)?)", text, flags=re.S)
    for scores, ans in averages:
        vals = [int(s) for s in scores.split(", ")]
        assert abs(Fraction(sum(vals), len(vals)) - Fraction(ans)) < Fraction(1, 100)
    assert len(averages) > 20


def test_generator_is_deterministic(records, monkeypatch):
    """Regenerating the first records with the shipped generator gives the same bytes."""
    monkeypatch.syspath_prepend(str(DATA))
    import generate
    monkeypatch.setattr(generate, "N_CALIB", 12)
    assert generate.build_calib(generate.Counter()) == records[:12]


# ---------------------------------------------------------------- sampling

def test_calibration_samples_reproducible_and_seeded(tok):
    a = calibration_samples(tok, nsamples=16, seqlen=256, seed=0)
    b = calibration_samples(tok, nsamples=16, seqlen=256, seed=0)
    c = calibration_samples(tok, nsamples=16, seqlen=256, seed=1)
    assert a.shape == (16, 256) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert dataset_fingerprint(a) == dataset_fingerprint(b) != dataset_fingerprint(c)
    cfg = CalibConfig(nsamples=16, seqlen=256, seed=1)
    assert torch.equal(cfg.samples(tok), c)


def test_chat_rendering_modes(tok):
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    plain = calibration_samples(tok, nsamples=64, seqlen=512, seed=3, chat=False)
    chat = calibration_samples(tok, nsamples=64, seqlen=512, seed=3, chat=True)
    assert not (plain == im_start).any()
    assert (chat == im_start).any()


def test_default_size_fits_and_too_many_raises(tok):
    assert calibration_samples(tok).shape == (128, 512)
    with pytest.raises(QuantError, match="must be positive"):
        calibration_samples(tok, nsamples=0)


def test_peer_size_512x2048_repeats_the_shipped_text(tok, tmp_path):
    """512 x 2048 (1M tokens, the peers' setting) runs on the ~247k shipped tokens: further passes
    over the documents, reshuffled, fill the stream; windows stay distinct and fully real text."""
    from qwen_quant.calib.sampling import pack_stream
    from qwen_quant.calib.sources import load_documents

    docs = load_documents("shipped")
    one = pack_stream(tok, docs, 0, False)
    assert one.size < 512 * 2048
    ids = calibration_samples(tok, nsamples=512, seqlen=2048, seed=0)
    assert ids.shape == (512, 2048)
    assert len({r.tobytes() for r in ids.numpy()}) == 512
    assert torch.equal(ids, calibration_samples(tok, nsamples=512, seqlen=2048, seed=0))
    longer = pack_stream(tok, docs, 0, False, min_tokens=512 * 2048)
    assert longer.size >= 512 * 2048 and np.array_equal(longer[:one.size], one)  # first pass unchanged
    short = tmp_path / "short.txt"
    short.write_text("a few dozen words of text, " * 20)  # ~140 tokens: repeatable, but not one window
    with pytest.raises(QuantError, match="fewer than one --seqlen 256 window"):
        calibration_samples(tok, source=str(short), nsamples=2, seqlen=256)
    with pytest.raises(QuantError, match=r"more than 16 passes"):
        calibration_samples(tok, source=str(short), nsamples=64, seqlen=128)


def test_greedy_prompts_and_training_texts(tok, records):
    prompts = greedy_prompts(tok)
    assert len(prompts) == 12
    for text, ids in prompts:
        assert ids == tok.encode(text, add_special_tokens=False)
    texts = training_texts()
    assert len(texts) == len(records)
    assert sum(t.startswith("<|im_start|>") for t in texts) == sum(r["kind"] == "chat" for r in records)


def test_eval_tokens_truncates(tok):
    full = eval_tokens(tok)
    assert full.dtype == np.int64 and full.ndim == 1
    assert np.array_equal(eval_tokens(tok, max_tokens=100), full[:100])


def test_fingerprint_is_int32_le_sha256():
    want = hashlib.sha256(np.array([1, 2, 151643], dtype="<i4").tobytes()).hexdigest()
    assert dataset_fingerprint([1, 2, 151643]) == want
    assert dataset_fingerprint(torch.tensor([[1, 2, 151643]])) == want
    assert dataset_fingerprint(np.array([1, 2, 151643], dtype=np.int64)) == want


# ---------------------------------------------------------------- other sources

def _words(n):
    return " ".join(f"word{i % 50}" for i in range(n))


def test_txt_jsonl_parquet_sources(tok, tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text(_words(3000), encoding="utf-8")
    x = calibration_samples(tok, txt, nsamples=4, seqlen=128, seed=0)
    assert x.shape == (4, 128)
    assert not torch.equal(x, calibration_samples(tok, str(txt), nsamples=4, seqlen=128, seed=5))
    assert len(eval_tokens(tok, txt)) == len(tok.encode(_words(3000)))

    jl = tmp_path / "c.jsonl"
    rows = [{"text": _words(200)} for _ in range(5)]
    rows.append({"messages": [{"role": "user", "content": "hi " * 100},
                              {"role": "assistant", "content": "hello " * 100}]})
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    y = calibration_samples(tok, jl, nsamples=4, seqlen=256, seed=0, chat=True)
    assert y.shape == (4, 256)
    assert eval_tokens(tok, jl).size > 1000

    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    pf = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": [_words(300)] * 4, "id": [1, 2, 3, 4]}), pf)
    assert calibration_samples(tok, pf, nsamples=2, seqlen=256).shape == (2, 256)
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"body": ["x"]}), bad)
    with pytest.raises(QuantError, match='no "text" column'):
        calibration_samples(tok, bad, nsamples=1, seqlen=1)


def test_file_errors(tok, tmp_path):
    with pytest.raises(QuantError, match="does not exist"):
        calibration_samples(tok, tmp_path / "nope.txt")
    empty = tmp_path / "e.txt"
    empty.write_text("")
    with pytest.raises(QuantError, match="is empty"):
        calibration_samples(tok, empty)
    blank = tmp_path / "b.jsonl"
    blank.write_text('{"text": "   "}\n')
    with pytest.raises(QuantError, match="is empty"):
        calibration_samples(tok, blank)
    odd = tmp_path / "c.csv"
    odd.write_text("a,b\n")
    with pytest.raises(QuantError, match="unknown extension '.csv'"):
        calibration_samples(tok, odd)
    broken = tmp_path / "x.jsonl"
    broken.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(QuantError, match=r"x.jsonl:2 is not valid JSON"):
        calibration_samples(tok, broken)
    notext = tmp_path / "y.jsonl"
    notext.write_text('{"body": "x"}\n')
    with pytest.raises(QuantError, match='neither a "text"'):
        calibration_samples(tok, notext)
    small = tmp_path / "s.txt"
    small.write_text("just a few words")
    with pytest.raises(QuantError, match="not enough calibration tokens: have 4, need 512"):
        calibration_samples(tok, small, nsamples=2, seqlen=256)


def test_chat_needs_template():
    no_template = types.SimpleNamespace(chat_template=None)
    with pytest.raises(QuantError, match="no chat template"):
        calib.sampling.render_document(no_template, [{"role": "user", "content": "hi"}], True)
    assert calib.render_plain([{"role": "user", "content": "hi"}]) == "user: hi"


def test_hf_spec_parsing():
    assert calib.parse_hf("wikitext2") == ("wikitext", "wikitext-2-raw-v1", "test", {})
    assert calib.parse_hf("c4")[0] == "allenai/c4"
    assert calib.parse_hf("hf:foo") == ("foo", None, "train", {})
    assert calib.parse_hf("hf:foo:bar:validation") == ("foo", "bar", "validation", {})
    with pytest.raises(QuantError, match="bad dataset spec"):
        calib.parse_hf("hf:")


def test_hf_without_datasets_package(tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(QuantError, match="pip install datasets"):
        calibration_samples(tok, "wikitext2")


def test_hf_cache_miss_and_hit(tok, monkeypatch):
    calls = []

    class FakeDS:
        column_names = ["text"]

        def __getitem__(self, key):
            return [_words(400), "", _words(400)]

    def load_dataset(name, config=None, split=None, **kw):
        calls.append((name, config, split))
        if name == "missing":
            raise FileNotFoundError("not cached")
        return FakeDS()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(QuantError, match="not in the local Hugging Face cache"):
        calibration_samples(tok, "hf:missing")
    x = calibration_samples(tok, "wikitext2", nsamples=2, seqlen=128)
    assert x.shape == (2, 128)
    assert calls[-1] == ("wikitext", "wikitext-2-raw-v1", "test")


def test_default_tokenizer_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("QWEN_QUANT_TOKENIZER", str(tmp_path))
    with pytest.raises(QuantError, match="QWEN_QUANT_TOKENIZER"):
        default_tokenizer_dir()
    (tmp_path / "tokenizer.json").write_text("{}")
    assert default_tokenizer_dir() == tmp_path
