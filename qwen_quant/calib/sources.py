"""Where calibration and evaluation text comes from.

A *source* string names one of: ``shipped`` (the project's own generated data in
``calib_data/``), a local ``.txt`` / ``.jsonl`` / ``.parquet`` file, ``hf:NAME[:CONFIG[:SPLIT]]``
or an alias (``wikitext2``, ``c4``) read from the local Hugging Face ``datasets`` cache.

Every source is reduced to a list of *documents* (strings, or chat message lists that the
sampler renders), so packing lives in one place (``sampling.py``). Hugging Face datasets are
joined into a single document with blank lines, as the GPTQ reference code does for wikitext,
because their rows are often lines of one article rather than independent documents.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

from qwen_quant.errors import QuantError

Document = Union[str, list]  # plain text, or a list of {"role", "content"} messages


# alias -> (dataset name, config, split, extra load_dataset kwargs)
HF_ALIASES = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", {}),
    "c4": ("allenai/c4", None, "validation",
           {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}}),
}
TEXT_EXTENSIONS = (".txt", ".jsonl", ".parquet")


def shipped_dir() -> Path:
    """Folder with calib.jsonl / eval.txt / prompts.jsonl (env ``QWEN_QUANT_CALIB_DIR`` overrides)."""
    from qwen_quant.resources import calib_dir

    path = calib_dir()
    if not (path / "calib.jsonl").is_file():
        raise QuantError(f"shipped calibration data not found in {path}; run "
                         "`python calib_data/generate.py` or set QWEN_QUANT_CALIB_DIR")
    return path


def read_jsonl(path: Path) -> list[dict]:
    """Parse a JSON-lines file, naming the bad line when one does not parse."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise QuantError(f"{path}:{lineno} is not valid JSON ({exc.msg}); "
                                 "fix the line or use a .txt file") from None
    return rows


def _row_document(row, where: str) -> Document:
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        return row["text"]
    if isinstance(row, dict) and isinstance(row.get("messages"), list):
        return row["messages"]
    raise QuantError(f"{where} has neither a \"text\" string nor a \"messages\" list; "
                     "give each JSON line one of them")


def shipped_calibration() -> list[Document]:
    path = shipped_dir() / "calib.jsonl"
    return [_row_document(row, f"{path} row {i}") for i, row in enumerate(read_jsonl(path))]


def shipped_eval_text() -> str:
    return (shipped_dir() / "eval.txt").read_text(encoding="utf-8")


def _local_documents(path: Path) -> list[Document]:
    if not path.exists():
        raise QuantError(f"calibration file {path} does not exist; check the --calib path")
    if path.suffix not in TEXT_EXTENSIONS:
        raise QuantError(f"calibration file {path} has unknown extension {path.suffix!r}; "
                         f"use one of {', '.join(TEXT_EXTENSIONS)} or hf:NAME")
    if path.stat().st_size == 0:
        raise QuantError(f"calibration file {path} is empty; give a file with text in it")
    if path.suffix == ".txt":
        docs: list[Document] = [path.read_text(encoding="utf-8")]
    elif path.suffix == ".jsonl":
        docs = [_row_document(r, f"{path} row {i}") for i, r in enumerate(read_jsonl(path))]
    else:
        docs = _parquet_documents(path)
    docs = [d for d in docs if d and (not isinstance(d, str) or d.strip())]
    if not docs:
        raise QuantError(f"calibration file {path} is empty; give a file with text in it")
    return docs


def _parquet_documents(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise QuantError("reading .parquet needs pyarrow; `pip install pyarrow`") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for bad files
        raise QuantError(f"cannot read {path} as parquet ({exc}); check the file") from None
    if "text" not in table.column_names:
        raise QuantError(f"{path} has no \"text\" column (columns: "
                         f"{', '.join(table.column_names)}); rename the text column to \"text\"")
    return [t for t in table.column("text").to_pylist() if isinstance(t, str)]


def parse_hf(source: str) -> tuple[str, str | None, str, dict]:
    """``hf:NAME[:CONFIG[:SPLIT]]`` or an alias -> (name, config, split, kwargs); split defaults to train."""
    if source in HF_ALIASES:
        return HF_ALIASES[source]
    parts = source[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise QuantError(f"bad dataset spec {source!r}; write hf:NAME[:CONFIG[:SPLIT]]")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return name, config, split, {}


def _hf_documents(source: str) -> list[Document]:
    name, config, split, kwargs = parse_hf(source)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # never reach for the network
    try:
        import datasets
    except ImportError:
        raise QuantError(f"calibration source {source!r} needs the `datasets` package; "
                         "`pip install datasets` (data must already be in the local cache)") from None
    try:
        ds = datasets.load_dataset(name, config, split=split, **kwargs)
    except Exception as exc:  # offline misses surface as ConnectionError, FileNotFoundError, ...
        raise QuantError(f"dataset {name} ({config or 'default'}, {split}) is not in the local "
                         f"Hugging Face cache ({type(exc).__name__}); download it on a machine "
                         "with network or use a local .txt/.jsonl/.parquet file") from None
    if "text" not in ds.column_names:
        raise QuantError(f"dataset {name} has no \"text\" column (columns: "
                         f"{', '.join(ds.column_names)}); use a local file instead")
    text = "\n\n".join(t for t in ds["text"] if t)
    if not text.strip():
        raise QuantError(f"dataset {name} ({split}) has no text; pick another split")
    return [text]


def load_documents(source: Union[str, Path]) -> list[Document]:
    """Calibration documents for ``source`` (see module docstring)."""
    source = str(source)
    if source == "shipped":
        return shipped_calibration()
    if source.startswith("hf:") or source in HF_ALIASES:
        return _hf_documents(source)
    return _local_documents(Path(source).expanduser())


def load_eval_text(source: Union[str, Path]) -> list[Document]:
    """Evaluation documents: the shipped eval.txt, or any calibration source read whole."""
    if str(source) == "shipped":
        return [shipped_eval_text()]
    return load_documents(source)
