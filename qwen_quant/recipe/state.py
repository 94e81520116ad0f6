"""Content keys for recipe steps and the state file that lets `qwen-quant run` skip and resume.

A step is skipped when its key matches the one recorded after it last succeeded and its outputs are
still the files it wrote (same names, sizes and mtimes). Keys hash what determines the output:

* the model: name, size and mtime of every weight file (hashing 150 GB of safetensors on every run
  would take longer than some builds), and the sha256 of every small file (config, tokenizer);
* the options: the filled config dataclass, minus paths the runner chooses;
* the data: the same rule for a local calibration/evaluation file or the shipped folder, else the
  source string (a cached hub dataset).

The state file is rewritten atomically (temp name + rename) after every step, so Ctrl-C at any
moment leaves either the old or the new state, and each exporter renames its own output into place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

STATE_FILE = "recipe-state.json"
STATE_VERSION = 1
SMALL_FILE = 1 << 20  # files below this are hashed by content


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def path_fingerprint(path: str | Path) -> str:
    """Hash of a file or folder: content for small files, name + size + mtime for big ones."""
    p = Path(path)
    if not p.exists():
        return _hash(["missing", str(path)])
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        rel = f.name if p.is_file() else str(f.relative_to(p))
        h.update(rel.encode() + b"\0")
        if st.st_size < SMALL_FILE:
            h.update(hashlib.sha256(f.read_bytes()).digest())
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def data_fingerprint(source: str) -> str:
    """A calibration/evaluation source: the shipped folder, a local file, or a hub dataset name."""
    if source == "shipped":
        from qwen_quant.calib import shipped_dir

        return path_fingerprint(shipped_dir())
    if Path(source).expanduser().exists():
        return path_fingerprint(Path(source).expanduser())
    return _hash(["source", source])


def config_key(cfg: Any, drop: tuple[str, ...] = ("model", "output", "outdir", "force", "validate", "json")) -> dict:
    d = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    for k in drop:
        d.pop(k, None)
    if getattr(cfg, "method", None):  # a class attribute of each quantizer config, not a field
        d["method"] = cfg.method
    return d


def key(*parts: Any) -> str:
    """Content key of a build step; the tool's version is part of it, so a new release rebuilds."""
    from qwen_quant import __version__

    return _hash([__version__, *parts])


def outputs_fingerprint(paths: list[str]) -> list[list]:
    """name, size, mtime of every output file: detects outputs that were deleted or replaced."""
    rows = []
    for p in map(Path, paths):
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
        if not files:
            rows.append([str(p), None, None])
        for f in files:
            st = f.stat()
            rows.append([str(f), st.st_size, st.st_mtime_ns])
    return rows


class State:
    """``OUT/recipe-state.json``: per step its keys, outputs, results and status."""

    def __init__(self, outdir: Path):
        self.path = Path(outdir) / STATE_FILE
        self.data: dict[str, Any] = {"version": STATE_VERSION, "convert": None, "artifacts": {}}
        if self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text())
                if loaded.get("version") == STATE_VERSION:
                    self.data = loaded
            except (json.JSONDecodeError, AttributeError):
                pass  # unreadable state: rebuild everything (outputs are replaced atomically)

    def artifact(self, name: str) -> dict[str, Any]:
        return self.data["artifacts"].get(name) or {}

    def set_artifact(self, name: str, entry: dict[str, Any]) -> None:
        self.data["artifacts"][name] = entry
        self.save()

    def built(self, name: str, build_key: str) -> bool:
        """The artifact was built with these inputs and its outputs are untouched since."""
        e = self.artifact(name)
        return (e.get("build_key") == build_key and bool(e.get("outputs"))
                and e.get("outputs_fp") == outputs_fingerprint(e["outputs"]))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)
