"""The integer grid shared by every weight quantizer (GPTQ, AWQ, RTN) and every packer.

A weight row is split into groups of ``group_size`` input columns; each (row, group) has a float
``scale`` and an integer ``zero`` in [0, maxq], and weight ``w`` is stored as the code
``q = clamp(round(w / scale) + zero, 0, maxq)``, read back as ``scale * (q - zero)``.
Symmetric grids fix ``zero = (maxq + 1) / 2`` (as GPTQ and Qwen's GPTQ releases do).

Classic GPTQ checkpoints store ``zero - 1``, so a zero point of 0 cannot be represented there;
asymmetric groups whose minimum is exactly 0 therefore use ``zero = 1`` and a scale that still
reaches their maximum. This costs one grid step only in those (rare) groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Grid:
    bits: int = 4
    group_size: int = 128  # -1: one group over the whole row
    sym: bool = True

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def size(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


@dataclass
class QuantResult:
    """What a quantizer chose for one linear: integer codes and per-group parameters."""

    codes: torch.Tensor  # int32 [out, in], values in [0, maxq]
    scales: torch.Tensor  # float32 [out, groups]
    zeros: torch.Tensor  # int32 [out, groups]
    g_idx: torch.Tensor  # int32 [in]: group of each input column
    grid: Grid
    error: float = 0.0  # mean relative reconstruction error ||(W - Q) X|| / ||W X|| when known
    row_stats: tuple | None = None  # GPTQ: per-row (||(W - Q) X||^2, ||W X||^2), to split stacked solves

    def to(self, device) -> "QuantResult":
        return QuantResult(self.codes.to(device), self.scales.to(device), self.zeros.to(device), self.g_idx.to(device),
                           self.grid, self.error)

    def dequant(self) -> torch.Tensor:
        g = self.g_idx.long()
        return self.scales[:, g] * (self.codes - self.zeros[:, g]).float()


def find_params(w: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero for each row of ``w`` [rows, cols] (one group)."""
    w = w.float()
    return minmax_params(w.amin(1), w.amax(1), grid)


def minmax_params(xmin: torch.Tensor, xmax: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """`find_params` from each group's min and max (any shape): min/max compose over column ranges,
    so GPTQ can take a group's parameters from two slices without concatenating them."""
    maxq = grid.maxq
    xmin = torch.clamp(xmin.float(), max=0)
    xmax = torch.clamp(xmax.float(), min=0)
    if grid.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)  # torch.where, not masked assignment: no host sync on the GPU
    xmin, xmax = torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if grid.sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale)
        at0 = zero < 1  # classic GPTQ stores zero-1: keep zero >= 1 and still reach xmax
        scale = torch.where(at0, xmax / (maxq - 1), scale)
        zero = torch.where(at0, 1.0, zero)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Codes for ``w`` [rows, cols] with per-row ``scale``/``zero`` [rows] (or broadcastable)."""
    if scale.dim() == 1:
        scale, zero = scale[:, None], zero[:, None]
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def rtn_quantize(w: torch.Tensor, grid: Grid) -> QuantResult:
    """Round-to-nearest on the same grid: the baseline every smarter quantizer must beat."""
    w = w.float()
    out, cols = w.shape
    gs = grid.size(cols)
    scales, zeros, codes = [], [], []
    for i in range(0, cols, gs):
        s, z = find_params(w[:, i:i + gs], grid)
        codes.append(quantize_codes(w[:, i:i + gs], s, z, grid.maxq))
        scales.append(s)
        zeros.append(z)
    g_idx = torch.arange(cols, dtype=torch.int32, device=w.device) // gs
    return QuantResult(torch.cat(codes, 1).int(), torch.stack(scales, 1), torch.stack(zeros, 1).int(), g_idx, grid)
