"""Writing and reading sharded safetensors checkpoints without holding the model in memory.

`CheckpointWriter` takes tensors layer by layer, flushes shards as they fill, and assembles the
final folder (config, index, tokenizer and generation files) under a temporary name that is renamed
into place only after everything is written: an interrupted or failed run never leaves a folder
that looks complete. `WeightStore` reads single tensors lazily from a checkpoint's shards.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from qwen_quant.errors import QuantError

COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
              "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
              "LICENSE", "NOTICE", "README.md")


class WeightStore:
    """Tensor name -> tensor, read on demand from model.safetensors or its index."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        idx = self.dir / "model.safetensors.index.json"
        if idx.exists():
            self.where = json.loads(idx.read_text())["weight_map"]
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise QuantError(f"{self.dir} has no *.safetensors weights; convert .bin checkpoints to safetensors first")
            from safetensors import safe_open

            self.where = {}
            for f in files:
                with safe_open(str(f), "pt") as h:
                    self.where.update({k: f.name for k in h.keys()})
        self._open: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        f = self.where[name]
        if f not in self._open:
            self._open[f] = safe_open(str(self.dir / f), "pt")
        return self._open[f].get_tensor(name)

    def names(self, prefix: str = "") -> list[str]:
        return [k for k in self.where if k.startswith(prefix)]


class CheckpointWriter:
    def __init__(self, out: str | Path, force: bool = False, shard_bytes: int = 4 * 2**30):
        self.out = Path(out)
        if self.out.exists() and not force:
            raise QuantError(f"output {self.out} already exists; pass --force to replace it or choose another -o")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.with_name(f".{self.out.name}.partial")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        self.shard_bytes = shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[dict[str, str]] = []
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            v = v.detach().contiguous().cpu()
            self.pending[k] = v
            self.pending_bytes += v.numel() * v.element_size()
        if self.pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        from safetensors.torch import save_file

        name = f"shard-{len(self.shards):05d}.safetensors"
        try:
            save_file(self.pending, str(self.tmp / name), metadata={"format": "pt"})
        except OSError as err:
            raise QuantError(f"could not write {self.tmp / name} ({err.strerror}); free disk space and run again") from None
        self.shards.append({k: name for k in self.pending})
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def finish(self, config: dict, source_dir: str | Path, extra_files: dict[str, str] | None = None) -> Path:
        """Write config, index and copied files, then move the folder into place."""
        self.flush()
        n = len(self.shards)
        weight_map = {}
        for i, shard in enumerate(self.shards):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.tmp / next(iter(shard.values())), self.tmp / final)
            weight_map.update({k: final for k in shard})
        if n > 1:
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        for f in COPY_FILES:
            if (Path(source_dir) / f).exists():
                shutil.copy(Path(source_dir) / f, self.tmp / f)
        for f, text in (extra_files or {}).items():
            (self.tmp / f).write_text(text)
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old")
            os.replace(self.out, old)
            shutil.rmtree(old)
        os.replace(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
