"""Little-endian bit-stream packing of b-bit codes into int32 words.

Classic GPTQ packs ``32 / bits`` codes per word for 2/4/8 bits and, for 3 bits, 32 codes into 3
words with codes straddling word boundaries (AutoGPTQ's pack loop). Both are the same thing: code
``k`` occupies bits ``[k*bits, (k+1)*bits)`` of a little-endian bit stream. One vectorised packer
therefore serves every bit width; it is written here because no maintained package exposes the
classic GPTQ layout (compressed-tensors packs along the other axis and differently for 3 bits).
"""

from __future__ import annotations

import numpy as np
import torch


def packable(n: int, bits: int) -> bool:
    """Whether ``n`` codes fill whole int32 words."""
    return (n * bits) % 32 == 0


def pack_bits(codes: np.ndarray, bits: int, axis: int = 0) -> np.ndarray:
    """Pack unsigned codes along ``axis`` into int32 words (n * bits must be a multiple of 32)."""
    c = np.moveaxis(np.asarray(codes, dtype=np.uint64), axis, 0)
    n0 = c.shape[0]
    if not packable(n0, bits):
        raise ValueError(f"cannot pack {n0} {bits}-bit codes into whole int32 words")
    n = -(-n0 // 32) * 32
    if n != n0:
        c = np.concatenate([c, np.zeros((n - n0, *c.shape[1:]), dtype=c.dtype)])
    c = c.reshape(n // 32, 32, *c.shape[1:]) & np.uint64(2**bits - 1)
    words = np.zeros((n // 32, bits, *c.shape[2:]), dtype=np.uint64)
    for k in range(32):
        off = k * bits
        w, s = divmod(off, 32)
        words[:, w] |= (c[:, k] << np.uint64(s)) & np.uint64(0xFFFFFFFF)
        if s + bits > 32:
            words[:, w + 1] |= c[:, k] >> np.uint64(32 - s)
    out = words.reshape(n // 32 * bits, *c.shape[2:])[: n0 * bits // 32].astype(np.uint32).view(np.int32)
    return np.moveaxis(out, 0, axis)


def unpack_bits(words: np.ndarray, bits: int, axis: int = 0) -> np.ndarray:
    """Inverse of `pack_bits`: int32 words -> int32 codes along ``axis``."""
    w = np.moveaxis(np.asarray(words).view(np.uint32).astype(np.uint64), axis, 0)
    m0 = w.shape[0]
    m = -(-m0 // bits) * bits
    if m != m0:
        w = np.concatenate([w, np.zeros((m - m0, *w.shape[1:]), dtype=w.dtype)])
    w = w.reshape(m // bits, bits, *w.shape[1:])
    codes = np.zeros((m // bits, 32, *w.shape[2:]), dtype=np.uint64)
    mask = np.uint64(2**bits - 1)
    for k in range(32):
        wi, s = divmod(k * bits, 32)
        v = w[:, wi] >> np.uint64(s)
        if s + bits > 32:
            v |= w[:, wi + 1] << np.uint64(32 - s)
        codes[:, k] = v & mask
    out = codes.reshape(m // bits * 32, *w.shape[2:])[: m0 * 32 // bits].astype(np.int32)
    return np.moveaxis(out, 0, axis)


def pack_bits_torch(codes: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """`pack_bits` in torch, on whatever device ``codes`` live (the GPU during quantization).

    Same little-endian bit stream, bit for bit (tests compare the two): words are built in int64
    (a code shifted to bit 28 does not fit a signed int32) and the low 32 bits reinterpreted as int32.
    One vectorised pass per code slot (32 slots), so a layer packs in a few dozen kernels instead of
    a host round trip per tensor.
    """
    c = codes.movedim(dim, 0).to(torch.int64)
    n0 = c.shape[0]
    if not packable(n0, bits):
        raise ValueError(f"cannot pack {n0} {bits}-bit codes into whole int32 words")
    n = -(-n0 // 32) * 32
    if n != n0:
        c = torch.cat([c, c.new_zeros(n - n0, *c.shape[1:])])
    c = c.reshape(n // 32, 32, *c.shape[1:]) & (2**bits - 1)
    words = c.new_zeros(n // 32, bits, *c.shape[2:])
    for k in range(32):
        w, s = divmod(k * bits, 32)
        words[:, w] |= (c[:, k] << s) & 0xFFFFFFFF
        if s + bits > 32:
            words[:, w + 1] |= c[:, k] >> (32 - s)
    out = words.reshape(n // 32 * bits, *c.shape[2:])[: n0 * bits // 32]
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)
    return out.movedim(0, dim).contiguous()
