"""Where the shipped files are: the recipes, the calibration/evaluation data, and the Qwen2 tokenizer.

In a clone they are the top-level ``recipes/`` and ``calib_data/`` folders; an installed wheel carries
them as ``qwen_quant/recipes`` and ``qwen_quant/calib_data`` (setup.py), found with importlib.resources.
The tokenizer is not shipped: ``$QWEN_QUANT_TOKENIZER``, else ``../shared/fixtures/qwen2-tokenizer``
beside the clone or beside the working directory.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

from qwen_quant.errors import QuantError

REPO_ROOT = Path(__file__).resolve().parents[1]


def shipped(name: str) -> Path:
    """The folder ``name`` ("recipes" or "calib_data"): inside the installed package, else in the clone."""
    packaged = Path(str(files("qwen_quant") / name))
    return packaged if packaged.is_dir() else REPO_ROOT / name


def recipe(name: str) -> Path:
    """A shipped recipe by file name, e.g. ``recipe("demo.yaml")``."""
    return shipped("recipes") / name


def calib_dir() -> Path:
    """Folder with calib.jsonl / eval.txt / prompts.jsonl (``$QWEN_QUANT_CALIB_DIR`` overrides)."""
    env = os.environ.get("QWEN_QUANT_CALIB_DIR")
    return Path(env) if env else shipped("calib_data")


def tokenizer_dir() -> Path:
    """The real Qwen2 tokenizer: ``$QWEN_QUANT_TOKENIZER``, else ``../shared/fixtures/qwen2-tokenizer``."""
    env = os.environ.get("QWEN_QUANT_TOKENIZER")
    rel = Path("shared") / "fixtures" / "qwen2-tokenizer"
    candidates = [Path(env)] if env else [REPO_ROOT.parent / rel, Path.cwd().parent / rel, Path.cwd() / rel]
    for path in candidates:
        if (path / "tokenizer.json").is_file():
            return path
    raise QuantError(f"Qwen2 tokenizer not found at {candidates[0]}; set QWEN_QUANT_TOKENIZER to a "
                     "folder with tokenizer.json")
