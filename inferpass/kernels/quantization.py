"""Asymmetric min/max group quantization and bit packing (KIVI; TECHNIQUES.md §2).

For a group of values along ``dim``: ``scale = (max - min) / (2^b - 1)``, ``zero = min``,
``code = clamp(round((x - zero) / scale), 0, 2^b - 1)``, ``x̂ = code · scale + zero``.
A constant group (``max == min``) gets ``scale = 1``: codes 0, round trip exact.
Otherwise ``|x - x̂| <= scale / 2`` up to fp rounding. Scales and zeros are stored in
``stats_dtype`` (fp16 by default, as KIVI does); the bound then holds for the stored
scale and zero, which are what dequantization uses.

Packing puts ``8 / b`` codes in one uint8 along the last axis, lowest bits first;
``unpack(pack(c)) == c`` for every code array (a bijection).
"""

from __future__ import annotations

import torch

BITS = (2, 4, 8)


def check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")


def quantize(x: torch.Tensor, bits: int, dim: int, stats_dtype: torch.dtype = torch.float16
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize groups spanning ``dim`` (kept as size 1 in the stats): ``(codes uint8, scale, zero)``."""
    check_bits(bits)
    levels = 2**bits - 1
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    zero = lo.to(stats_dtype)
    scale = ((hi - lo) / levels).to(stats_dtype)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.round((x.float() - zero.float()) / scale.float()).clamp(0, levels)
    return codes.to(torch.uint8), scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    """``codes · scale + zero`` (broadcasting the stats over their group axis), in ``dtype``."""
    return (codes.float() * scale.float() + zero.float()).to(dtype)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``< 2^bits`` along the last axis (its size a multiple of ``8 / bits``) into uint8."""
    check_bits(bits)
    per_byte = 8 // bits
    if codes.shape[-1] % per_byte:
        raise ValueError(f"last axis {codes.shape[-1]} is not a multiple of {per_byte} ({bits}-bit packing)")
    grouped = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    packed = grouped[..., 0]
    for i in range(1, per_byte):
        packed = packed | (grouped[..., i] << (i * bits))
    return packed.contiguous()


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack``: uint8 ``[..., n]`` -> codes uint8 ``[..., n · 8 / bits]`` (shifts on uint8, no widening)."""
    check_bits(bits)
    per_byte = 8 // bits
    mask = 2**bits - 1
    codes = torch.stack([(packed >> (i * bits)) & mask for i in range(per_byte)], dim=-1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)
