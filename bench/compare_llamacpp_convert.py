#!/usr/bin/env python3
"""Diff our float GGUF against llama.cpp's own convert_hf_to_gguf.py output, value for value.

Maintainer-run (llama.cpp is not shipped): point --convert at a llama.cpp checkout's
convert_hf_to_gguf.py. Both files are written from MODEL with the same --outtype, then every
metadata key (type and value) and every tensor (name, type, shape, bytes) is compared.

    python bench/compare_llamacpp_convert.py ./Qwen2-0.5B --convert ~/llama.cpp/convert_hf_to_gguf.py

Any family with a GGUF architecture works the same way (qwen2, qwen3, qwen2_moe, qwen3_moe, and the
hybrid qwen3_next / qwen3_5 / qwen3_5_moe, compared with the converter's ``--no-mtp`` since our text GGUF
leaves the multi-token-prediction head out); the last line also says whether the two files are byte-identical.

The converter's ``Qwen2Model.set_vocab`` (also used by Qwen3) imports sentencepiece before it looks for
a ``tokenizer.model``, and catches only the missing file: without the package it dies before reaching
the BPE vocabulary it would write. When sentencepiece is not installed, the converter runs with an
empty stand-in module on its path, which changes nothing else (the Qwen tokenizer has no
``tokenizer.model``, so the converter falls through to the gpt2 vocabulary as with the real package).

Exit code 0: identical (except keys passed with --ignore); 1: differences (listed).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def fields(path: Path) -> dict[str, tuple[str, object]]:
    import gguf

    out = {}
    for name, f in gguf.GGUFReader(path).fields.items():
        if name.startswith("GGUF."):
            continue
        kind = "/".join(t.name for t in f.types)
        val = f.contents()
        out[name] = (kind, val)
    return out


def tensors(path: Path) -> dict[str, tuple[str, tuple, np.ndarray]]:
    import gguf

    return {t.name: (t.tensor_type.name, tuple(int(n) for n in t.shape), np.asarray(t.data))
            for t in gguf.GGUFReader(path).tensors}


def _short(v) -> str:
    s = repr(v)
    return s if len(s) < 120 else s[:117] + "..."


def diff(ours: Path, theirs: Path, ignore: set[str]) -> list[str]:
    problems = []
    fa, fb = fields(ours), fields(theirs)
    for k in sorted(set(fa) | set(fb)):
        if k in ignore:
            continue
        if k not in fa:
            problems.append(f"metadata {k}: missing in ours (llama.cpp: {_short(fb[k])})")
        elif k not in fb:
            problems.append(f"metadata {k}: only in ours ({_short(fa[k])})")
        elif fa[k] != fb[k]:
            problems.append(f"metadata {k}: ours {_short(fa[k])} != llama.cpp {_short(fb[k])}")
    ta, tb = tensors(ours), tensors(theirs)
    for k in sorted(set(ta) | set(tb)):
        if k not in ta or k not in tb:
            problems.append(f"tensor {k}: only in {'llama.cpp' if k in tb else 'ours'}")
            continue
        (qa, sa, da), (qb, sb, db) = ta[k], tb[k]
        if (qa, sa) != (qb, sb):
            problems.append(f"tensor {k}: ours {qa}{list(sa)} != llama.cpp {qb}{list(sb)}")
        elif da.tobytes() != db.tobytes():
            n = int((da.view(np.uint8) != db.view(np.uint8)).sum())
            problems.append(f"tensor {k}: {n} bytes differ")
    return problems


def run_converter(convert: Path, model: Path, out: Path, outtype: str, work: Path, extra: tuple[str, ...] = ()) -> None:
    """Run convert_hf_to_gguf.py with this Python (see the module docstring); ``extra``: more converter flags."""
    env = dict(os.environ)
    if importlib.util.find_spec("sentencepiece") is None:
        stub = work / "sentencepiece-stub"
        stub.mkdir(exist_ok=True)
        (stub / "sentencepiece.py").write_text("class SentencePieceProcessor:\n    pass\n")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(stub), env.get("PYTHONPATH")]))
    res = subprocess.run([sys.executable, str(convert), str(model), "--outfile", str(out), "--outtype", outtype, *extra],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if res.returncode:
        tail = "\n".join(res.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"{convert} exited {res.returncode}:\n{tail}")


def converter_flags(model: Path) -> tuple[str, ...]:
    """``--no-mtp`` where our text GGUF leaves the multi-token-prediction head out (the hybrid families)."""
    from qwen_quant.export.gguf import load_hparams

    _, family = load_hparams(model)
    return ("--no-mtp",) if any("mtp" in p for p in family.gguf.skip) else ()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="Hugging Face checkpoint folder (any family with a GGUF architecture)")
    ap.add_argument("--convert", type=Path, required=True, help="llama.cpp's convert_hf_to_gguf.py")
    ap.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16"])
    ap.add_argument("--workdir", type=Path, default=None, help="keep both GGUFs here (default: a temp dir)")
    ap.add_argument("--ignore", action="append", default=[], help="metadata key to skip (repeatable)")
    args = ap.parse_args(argv)

    from qwen_quant.export.gguf import write_float_gguf

    work = args.workdir or Path(tempfile.mkdtemp(prefix="gguf-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    ours, theirs = work / f"ours-{args.outtype}.gguf", work / f"llamacpp-{args.outtype}.gguf"
    write_float_gguf(args.model, ours, args.outtype)
    run_converter(args.convert, args.model, theirs, args.outtype, work, converter_flags(args.model))
    problems = diff(ours, theirs, set(args.ignore))
    for p in problems:
        print(p)
    same_bytes = ours.read_bytes() == theirs.read_bytes()
    print(f"{'IDENTICAL' if not problems else f'{len(problems)} difference(s)'}"
          f"{' (byte-identical files)' if same_bytes else ''}: {ours} vs {theirs}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
