"""Bit packing: b-bit unsigned integers stored densely in uint8 (two int4 per byte, four int2,
eight int3 in three bytes). Packing runs along the last dimension; the round trip is exact."""

from __future__ import annotations

import math

import torch

from lmforge.common import LmforgeError


def _chunk(bits: int) -> tuple[int, int]:
    """(values, bytes) of the smallest whole-byte chunk: int4 -> (2, 1), int3 -> (8, 3), int2 -> (4, 1)."""
    if bits not in (1, 2, 3, 4, 5, 6, 7, 8):
        raise LmforgeError(f"cannot pack {bits}-bit values: bits must be in 1..8")
    n_bits = math.lcm(bits, 8)
    return n_bits // bits, n_bits // 8


def packed_size(n: int, bits: int) -> int:
    """Bytes that `n` values of `bits` bits take once packed (padded to a whole chunk)."""
    values, nbytes = _chunk(bits)
    return -(-n // values) * nbytes


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., n] integers in [0, 2**bits) -> [..., packed_size(n, bits)] uint8."""
    values, nbytes = _chunk(bits)
    n = q.shape[-1]
    pad = -n % values
    q = q.to(torch.int64)
    if pad:
        q = torch.nn.functional.pad(q, (0, pad))
    q = q.reshape(*q.shape[:-1], -1, values)  # [..., chunks, values]
    shifts = torch.arange(values, device=q.device) * bits
    word = (q << shifts).sum(-1, keepdim=True)  # one integer of values*bits <= 56 bits per chunk
    byte_shifts = torch.arange(nbytes, device=q.device) * 8
    out = (word >> byte_shifts) & 0xFF  # [..., chunks, nbytes]
    return out.reshape(*out.shape[:-2], -1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: [..., packed] uint8 -> [..., n] uint8."""
    values, nbytes = _chunk(bits)
    b = packed.to(torch.int64).reshape(*packed.shape[:-1], -1, nbytes)
    byte_shifts = torch.arange(nbytes, device=packed.device) * 8
    word = (b << byte_shifts).sum(-1, keepdim=True)
    shifts = torch.arange(values, device=packed.device) * bits
    q = (word >> shifts) & ((1 << bits) - 1)
    return q.reshape(*q.shape[:-2], -1)[..., :n].to(torch.uint8)
