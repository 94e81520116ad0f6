"""The quantization config dataclass that the CLI and recipes fill, and its input checks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import ClassVar

from qwen_quant.calib import CalibConfig
from qwen_quant.errors import QuantError
from qwen_quant.validate import EvalConfig

BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128, -1)
FORMATS = {"gptq": ("gptq", "compressed-tensors"), "rtn": ("gptq", "compressed-tensors"),
           "awq": ("awq", "compressed-tensors")}


@dataclass
class QuantConfig:
    """Fields every weight-only method shares. Use a method's own config (`GPTQConfig`, `AWQConfig`,
    `RTNConfig`): the driver dispatches on the config's type, so a config can only ever produce its
    own method's result."""

    method: ClassVar[str] = ""
    model: str = ""
    output: str = ""
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    format: str = "gptq"
    true_sequential: bool = True  # recapture each linear group's inputs after the earlier groups are quantized
    calib: CalibConfig = field(default_factory=CalibConfig)
    chat: bool | None = None  # None: chat-formatted calibration when the model folder name says chat/instruct
    device: str = "auto"
    pad: bool = False
    force: bool = False
    validate: bool = True
    eval: EvalConfig = field(default_factory=EvalConfig)
    batch_size: int = 4
    phases: bool = False  # time each layer's phases (waits for the device at every mark)
    # Mixture-of-Experts calibration: "routed" (each expert's statistics from the tokens routed to it)
    # or "all" (every token through every expert; the layer's output still uses the routed ones)
    moe_calibrate: str = "routed"
    moe_min_tokens: int = 32  # an expert routed fewer calibration tokens falls back to round-to-nearest

    def check(self) -> None:
        if type(self) is QuantConfig or self.method not in FORMATS:
            raise QuantError(f"choose a method: {', '.join(FORMATS)} (GPTQConfig, RTNConfig or AWQConfig)")
        if self.bits not in BITS:
            raise QuantError(f"--bits {self.bits} is not supported; use one of {', '.join(map(str, BITS))}")
        if self.group_size not in GROUP_SIZES:
            raise QuantError(f"--group-size {self.group_size} is not supported; use one of {', '.join(map(str, GROUP_SIZES))}")
        if self.format not in FORMATS[self.method]:
            raise QuantError(f"--format {self.format} is not available for {self.method}; use one of {', '.join(FORMATS[self.method])}")
        if self.moe_calibrate not in ("routed", "all"):
            raise QuantError(f"--moe-calibrate {self.moe_calibrate!r} is not known; use routed or all")
        if self.moe_min_tokens < 0:
            raise QuantError(f"--moe-min-tokens {self.moe_min_tokens} must be 0 or more")
        if self.format == "compressed-tensors" and self.bits not in (4, 8):
            raise QuantError("compressed-tensors output is written for 4 or 8 bits (W4A16/W8A16); use --format gptq for other widths")

    def options(self) -> dict:
        """The method's own fields (what the summary records beside the shared ones)."""
        shared = {f.name for f in fields(QuantConfig)}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in shared}


@dataclass
class GPTQConfig(QuantConfig):
    method: ClassVar[str] = "gptq"
    desc_act: bool = False
    damp: float = 0.01

    def check(self) -> None:
        super().check()
        if not 0 < self.damp < 1:
            raise QuantError(f"--damp {self.damp} must be between 0 and 1 (fraction of the mean Hessian diagonal)")


@dataclass
class RTNConfig(QuantConfig):
    """Round-to-nearest: no solve, the calibration only measures each linear's error."""

    method: ClassVar[str] = "rtn"


@dataclass
class AWQConfig(QuantConfig):
    """AutoAWQ's defaults: asymmetric grid, GEMM layout, clip search."""

    method: ClassVar[str] = "awq"
    sym: bool = False
    format: str = "awq"
    clip: bool = True
    duo_scaling: bool = True
    n_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int = 512

    def check(self) -> None:
        super().check()
        if self.format == "awq" and self.bits != 4:
            raise QuantError(f"the AWQ GEMM format stores 4-bit weights only (got --bits {self.bits}); "
                             "use --bits 4 or --format compressed-tensors")
        if self.format == "awq" and self.group_size == -1:
            raise QuantError("the AWQ GEMM format needs a group size (32, 64 or 128); use --format compressed-tensors for per-channel")


CONFIGS: dict[str, type[QuantConfig]] = {c.method: c for c in (GPTQConfig, RTNConfig, AWQConfig)}


def config_for(method: str, **fields_) -> QuantConfig:
    """The config class of ``method`` filled with ``fields_`` (what the CLI and recipes use)."""
    if method not in CONFIGS:
        raise QuantError(f"unknown method {method!r}; use one of {', '.join(CONFIGS)}")
    return CONFIGS[method](**fields_)


def plan_padding(cfg: QuantConfig, hf: dict, family) -> int:
    """Extra zero units to add to the family's paddable dimension, or a QuantError that says why.

    Every linear's in-features must split into whole groups and whole int32 words of codes. Only a
    dimension the family declares paddable (the MLP's intermediate size: zero rows in gate/up and
    zero columns in down leave the model's function unchanged, silu(0) * 0 = 0) may be fixed:
    ``--pad`` pads it to a multiple of 8 x group size, which is what Qwen did for Qwen2-72B's
    GPTQ/AWQ releases (29568 -> 29696), so that groups also split evenly across up to 8 GPUs of
    tensor parallelism.
    """
    gs, bits = cfg.group_size, cfg.bits
    word = 32 // math.gcd(bits, 32)  # in-features per whole int32 word of codes
    step = word if gs == -1 else gs * word // math.gcd(gs, word)
    pad = family.padding[0] if family.padding else None
    padded = set(pad.cols) if pad else set()
    for name, (d, _) in (family.linear_shapes(hf) if family.linear_shapes else {}).items():
        if name in padded:
            continue
        if gs != -1 and d % gs:
            raise QuantError(f"group size {gs} does not divide the in-features {d} of {name}; choose a group size that divides it")
        if d % word:
            raise QuantError(f"the in-features {d} of {name} cannot be packed at {bits} bits (needs a multiple of {word})")
    if pad is None:
        return 0
    inter = hf[pad.key]
    if cfg.pad:
        step = step * 8 if gs != -1 else step
        return (-inter) % step
    if inter % step:
        raise QuantError(f"group size {gs} does not divide the {pad.key.replace('_', ' ')} {inter} ({', '.join(pad.cols)} in-features); "
                         "pass --pad to pad it with zero units (exact, as Qwen did for Qwen2-72B) or choose another group size")
    return 0
