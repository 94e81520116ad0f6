"""The layer-by-layer driver shared by GPTQ and AWQ: load layer -> capture -> quantize -> write -> free.

The model is built on the meta device and each decoder layer is materialised from the checkpoint's
shards only while it is being quantized, so the full model never has to fit on the device (how a
72B model is quantized on one 80 GB GPU). Calibration activations flow through the layers already
quantized, as in the GPTQ reference. Linears are visited in the family's true-sequential groups:
a group's inputs are captured after the previous groups of the same layer were quantized.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from qwen_quant.formats.checkpoint import WeightStore
from qwen_quant.models.family import Family


def get_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


@dataclass
class Layerwise:
    model_dir: str
    config: dict
    family: Family
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    intermediate_pad: int = 0  # extra zero intermediate units (see `--pad`)
    batch_size: int = 4
    layer_index: int = 0  # the decoder layer last loaded

    def __post_init__(self):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.store = WeightStore(self.model_dir)
        cfg = AutoConfig.from_pretrained(self.model_dir)
        pads = self.family.padding
        if self.intermediate_pad:
            setattr(cfg, pads[0].key, getattr(cfg, pads[0].key) + self.intermediate_pad)
        self.hf_config = cfg
        with torch.device("meta"):  # a multimodal checkpoint gives its text model here (no vision tower)
            self.skeleton = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=self.dtype)
        from qwen_quant.quantize import moe

        moe.install(self.skeleton, self.family, cfg)  # per-expert linears in place of fused experts
        self.layers = self._module(self.family.layers_path)
        self.rotary = type(self._module(self.family.rotary_path))(config=self.skeleton.config).to(self.device)

    def _module(self, path: str) -> torch.nn.Module:
        """The skeleton's module for checkpoint path ``path`` (the family maps multimodal prefixes)."""
        return get_module(self.skeleton, self.family.module_path(path + ".")[:-1])

    # -- weights -----------------------------------------------------------------------------
    def _tensor(self, name: str, store: WeightStore | None = None) -> torch.Tensor:
        t = (store or self.store).get(name)
        if self.intermediate_pad:
            pad = self.family.padding[0]
            if name.endswith(tuple(f".{n}.weight" for n in pad.rows)):
                t = torch.cat([t, t.new_zeros(self.intermediate_pad, t.shape[1])], 0)
            elif name.endswith(tuple(f".{n}.weight" for n in pad.cols)):
                t = torch.cat([t, t.new_zeros(t.shape[0], self.intermediate_pad)], 1)
        return t

    def _read(self, path: str) -> dict[str, torch.Tensor]:
        """Host tensors of module ``path`` in the compute dtype (pinned when the device is CUDA).

        Runs on the prefetch thread with its own store (safetensors handles are not shared)."""
        if not hasattr(self, "_bg_store"):
            self._bg_store = WeightStore(self.model_dir)
        names = self._module(path).state_dict()
        out = {k: self._tensor(f"{path}.{k}", self._bg_store).to(self.dtype) for k in names}
        if self.device.startswith("cuda"):
            out = {k: v.pin_memory() for k, v in out.items()}
        return out

    def prefetch(self, path: str) -> None:
        """Start reading module ``path`` from disk while the current layer is quantized."""
        if not hasattr(self, "_prefetcher"):
            from qwen_quant.quantize.overlap import Prefetcher

            self._prefetcher = Prefetcher(self._read)
        self._prefetcher.start(path)

    def load(self, path: str) -> torch.nn.Module:
        """Materialise module ``path`` (e.g. "model.layers.3") on the device (prefetched if started)."""
        module = self._module(path)
        if path.startswith(self.family.layers_path + "."):
            self.layer_index = int(path.rsplit(".", 1)[1])  # which layer the family's module tree is asked for
        if hasattr(self, "_prefetcher"):
            host = self._prefetcher.get(path)
            sd = {k: v.to(self.device, non_blocking=True) for k, v in host.items()}
        else:
            sd = {k: self._tensor(f"{path}.{k}").to(self.device, self.dtype) for k in module.state_dict()}
        module.load_state_dict(sd, assign=True)
        return module

    def unload(self, path: str) -> None:
        module = self._module(path)
        module.to_empty(device="meta")
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def raw(self, path: str) -> dict[str, torch.Tensor]:
        """Tensors under ``path`` as stored (for copying non-quantized parts)."""
        return {k: self._tensor(k) for k in self.store.names(path + ".")} if path else {}

    def carried(self, written: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Every stored tensor outside the prefixes in ``written``, exactly as stored: a multimodal
        checkpoint's vision tower, multi-token-prediction weights (carried through byte for byte)."""
        return {k: self.store.get(k) for k in self.store.names() if not k.startswith(tuple(p + "." for p in written))}

    # -- activations -------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        w = self._tensor(f"{self.family.embed_path}.weight").to(self.device, self.dtype)
        h = torch.nn.functional.embedding(ids.to(self.device), w)
        del w
        seq = ids.shape[1]
        pos = torch.arange(seq, device=self.device)[None]
        cos, sin = self.rotary(h[:1], pos)
        self.pos_emb = (cos.to(self.dtype), sin.to(self.dtype))
        self.pos_ids = pos
        return h

    def _call(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = layer(x, attention_mask=None, position_ids=self.pos_ids, position_embeddings=self.pos_emb)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def forward(self, layer: torch.nn.Module, hidden: torch.Tensor, in_place: bool = False) -> torch.Tensor:
        """Run ``layer`` on every calibration sample (causal attention via SDPA, no mask needed).

        ``in_place``: write each batch's output over its input (a batch's input is not read again),
        which saves a second [samples, seq, hidden] buffer: 4 GiB for a 72B layer at 128 x 2048."""
        outs = hidden if in_place else torch.empty_like(hidden)
        for i in range(0, hidden.shape[0], self.batch_size):
            outs[i:i + self.batch_size] = self._call(layer, hidden[i:i + self.batch_size])
        return outs

    @torch.no_grad()
    def capture(self, layer: torch.nn.Module, names: Iterable[str], fn: Callable[[str, torch.Tensor], None],
                hidden: torch.Tensor, stop: bool = True) -> None:
        """Call ``fn(name, input)`` for the input of each named linear while the layer runs on all samples.

        ``stop``: each batch's forward ends as soon as every named linear has seen its input, so
        capturing q/k/v costs a norm, not a whole layer (the rest of the layer would be discarded)."""
        names = list(names)
        seen: set[str] = set()

        def hook(n, x):
            fn(n, x)
            seen.add(n)
            if stop and len(seen) == len(names):
                raise _Stop

        with hooks(layer, names, hook):
            for i in range(0, hidden.shape[0], self.batch_size):
                seen.clear()
                try:
                    self._call(layer, hidden[i:i + self.batch_size])
                except _Stop:
                    pass


class _Stop(Exception):
    """Raised by a capture hook once a batch has given every hooked linear its input."""


@contextlib.contextmanager
def hooks(layer: torch.nn.Module, names: Iterable[str], fn):
    handles = [get_module(layer, n).register_forward_hook(lambda m, inp, out, n=n: fn(n, inp[0])) for n in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
