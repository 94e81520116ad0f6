"""Write the shipped calibration, evaluation and prompt files (deterministic, seeded).

    python calib_data/generate.py            # rewrites calib.jsonl, eval.txt, prompts.jsonl

Why generate instead of download: the tests and fixtures must work offline and the repository
must not carry third-party text. All text comes from templates in ``textgen/``; the real Qwen2
tokenizer is used only to measure lengths (samples 150-600 tokens, eval >= 45k tokens).
eval.txt uses a different seed and drops any document that shares a paragraph (a
blank-line-separated block) with the calibration set, then the whole result is re-checked.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from tokenizers import Tokenizer  # noqa: E402

from qwen_quant.calib import default_tokenizer_dir, render_chatml  # noqa: E402
from textgen import GENERATORS, chat  # noqa: E402

CALIB_SEED, EVAL_SEED = 20240601, 777013
N_CALIB = 576
EVAL_TARGET_TOKENS = 48_000
MIN_TOKENS, MAX_TOKENS = 150, 600
KINDS = ["en", "zh", "code", "math", "chat"]
WEIGHTS = [30, 20, 17, 15, 18]
MAX_BYTES = 2_000_000

PROMPTS = [
    ("en-weather", "Weather for Lisbon on Friday. The morning will start with"),
    ("en-story", "Mara was a beekeeper who lived in a small harbor town. One morning she"),
    ("en-science", "Here is a simple explanation of why ice floats. Most substances are"),
    ("en-recipe", "Easy pancakes (serves 4)\nIngredients:\n- 2 cups of flour\n-"),
    ("zh-weather", "北京周三天气预报：白天多云，夜间小雨。最低气温"),
    ("zh-story", "小明是一名老师，住在山脚下的村子。每天早上，小明都会"),
    ("code-py", 'def is_prime(n):\n    """Trial division up to the square root is enough for small numbers.'),
    ("code-class", "class Inventory:\n    def __init__(self, capacity=20):\n        self.capacity = capacity\n"),
    ("code-sql", "-- Top 5 groups by total amount, ignoring missing values.\nSELECT customer_id,"),
    ("math-linear", "Problem: Solve for x: 3x + 7 = 25.\nSolution:\nStep 1:"),
    ("math-percent", "Problem: A jacket costs 80 dollars. It is on sale for 25% off. What is the final price?"),
    ("math-zh", "题目：一支笔5元，小明买了6支，付了50元，应该找回多少钱？\n解答："),
]


class Counter:
    def __init__(self):
        self.tok = Tokenizer.from_file(str(default_tokenizer_dir() / "tokenizer.json"))

    def __call__(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False).ids)


def make_sample(rng: random.Random, kind: str, count: Counter):
    """A text (or message list) of ``kind`` whose length lands in [MIN_TOKENS, MAX_TOKENS]."""
    target = rng.randint(180, 520)
    while True:
        if kind == "chat":
            msgs = chat.start(rng)
            while count(render_chatml(msgs)) < target and len(msgs) < 8:
                chat.add_turn(rng, msgs)
            n, value = count(render_chatml(msgs)), msgs
        else:
            paras: list[str] = []
            while count("\n\n".join(paras)) < target:
                paras += GENERATORS[kind](rng)
            value = "\n\n".join(paras)
            n = count(value)
        if MIN_TOKENS <= n <= MAX_TOKENS:
            return value


def as_text(record: dict) -> str:
    return record["text"] if "text" in record else render_chatml(record["messages"])


def pieces(text: str) -> set[str]:
    return {p.strip() for p in text.split("\n\n") if p.strip()}


def build_calib(count: Counter) -> list[dict]:
    rng = random.Random(CALIB_SEED)
    out = []
    for i in range(N_CALIB):
        kind = rng.choices(KINDS, WEIGHTS)[0]
        value = make_sample(rng, kind, count)
        key = "messages" if kind == "chat" else "text"
        out.append({"id": f"calib-{i:04d}", "kind": kind, key: value})
    return out


def build_eval(count: Counter, calib_pieces: set[str]) -> str:
    rng = random.Random(EVAL_SEED)
    seen = set(calib_pieces)
    docs, total = [], 0
    while total < EVAL_TARGET_TOKENS:
        kind = rng.choices(KINDS, WEIGHTS)[0]
        value = make_sample(rng, kind, count)
        text = render_chatml(value) if kind == "chat" else value
        ps = pieces(text)
        if ps & seen:
            continue  # shares a paragraph with calibration data or earlier eval text
        seen |= ps
        docs.append(text.strip())
        total += count(docs[-1]) + 1
    return "\n\n".join(docs) + "\n"


def write_atomic(path: Path, data: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, path)


def main() -> None:
    count = Counter()
    calib = build_calib(count)
    calib_pieces = set().union(*(pieces(as_text(r)) for r in calib))
    eval_text = build_eval(count, calib_pieces)
    prompts = [{"id": pid, "text": text} for pid, text in PROMPTS]

    lengths = [count(as_text(r)) for r in calib]
    assert len(calib) >= 512 and all(MIN_TOKENS <= n <= MAX_TOKENS for n in lengths)
    assert not pieces(eval_text) & calib_pieces, "eval paragraph found in calibration data"
    n_eval = count(eval_text)
    assert n_eval >= 45_000, n_eval
    assert all(10 <= count(p["text"]) <= 40 for p in prompts), [count(p["text"]) for p in prompts]

    files = {
        "calib.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in calib),
        "eval.txt": eval_text,
        "prompts.jsonl": "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts),
    }
    size = sum(len(v.encode("utf-8")) for v in files.values())
    assert size < MAX_BYTES, size
    for name, data in files.items():
        write_atomic(HERE / name, data)
    kinds = {k: sum(r["kind"] == k for r in calib) for k in KINDS}
    print(f"calib: {len(calib)} samples {kinds}, {sum(lengths)} tokens "
          f"(min {min(lengths)}, max {max(lengths)}); eval: {n_eval} tokens; {size} bytes total")


if __name__ == "__main__":
    main()
