"""A KIVI-style quantized KV cache for one layer: layout, functional append, and attention over it.

Per sequence of ``n`` tokens (``n`` = the row's ``start`` before a call), positions
``[0, n_q)`` are quantized and ``[n_q, n)`` sit in a full-precision window, where
``n_q = max(0, (n - R) // G) · G`` (``R`` = ``residual``, ``G`` = ``group``): the window
holds between ``R`` and ``R + G - 1`` tokens once the sequence is longer than ``R``,
so a full group of ``G`` tokens is quantized exactly once, when it leaves the window.

* keys: per channel, statistics over a group of ``G`` tokens (KIVI);
* values: per token, statistics over groups of ``min(G, head_dim)`` channels;
* codes ``b``-bit packed along channels; scales and zeros fp16; window in the model dtype.

Tensors of one layer (``B`` rows, ``H`` KV heads, ``D`` head dim, ``C`` = max_len rounded
up to ``G``, plus one scratch group at the end that absorbs writes of no group):
``k_codes [B,H,C+G,D·b/8]`` uint8, ``k_scale``/``k_zero [B,H,C/G+1,D]``, ``v_codes`` like
``k_codes``, ``v_scale``/``v_zero [B,H,C+G,D/Gv]``, ``k_window``/``v_window [B,H,R+G,D]``.

A call with ``S`` new tokens first attends (queries see the quantized prefix, the window
and the new tokens, causally, all exact in fp32 after dequantization), then appends
(``append``): groups that leave the window are quantized from their full-precision
values and written; codes already written are never touched again. Everything here is
functional and traceable (static shapes apart from ``S``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, field_validator

from inferpass.kernels.quantization import check_bits, dequantize, pack, quantize, unpack
from inferpass.kernels.split_kv_reference import dense_attention

STATS_DTYPE = torch.float16


class KVQuantSpec(BaseModel):
    """``bits`` per code, ``group`` tokens (keys) / channels (values) per statistics group, ``residual`` R."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    bits: int = 4
    group: int = 32
    residual: int = 32

    @field_validator("bits")
    @classmethod
    def _bits(cls, value):
        check_bits(value)
        return value

    @field_validator("group", "residual")
    @classmethod
    def _positive(cls, value):
        if value < 1:
            raise ValueError("must be >= 1")
        return value

    @property
    def window(self) -> int:
        return self.residual + self.group

    def value_group(self, head_dim: int) -> int:
        group = min(self.group, head_dim)
        if head_dim % group or head_dim % (8 // self.bits):
            raise ValueError(f"head_dim {head_dim} must be a multiple of the value group {group} and of "
                             f"{8 // self.bits} codes per byte")
        return group

    def capacity(self, max_len: int) -> int:
        """Quantized token slots: ``max_len`` rounded up to a whole group."""
        return -(-max_len // self.group) * self.group

    def shapes(self, kv_heads: int, head_dim: int, max_len: int) -> dict[str, tuple[int, ...]]:
        """Per-row shapes (without the batch axis) of a layer's tensors, in ``LayerCache`` order."""
        c, g = self.capacity(max_len), self.group
        packed = head_dim * self.bits // 8
        vg = self.value_group(head_dim)
        return {
            "k_codes": (kv_heads, c + g, packed), "k_scale": (kv_heads, c // g + 1, head_dim),
            "k_zero": (kv_heads, c // g + 1, head_dim), "v_codes": (kv_heads, c + g, packed),
            "v_scale": (kv_heads, c + g, head_dim // vg), "v_zero": (kv_heads, c + g, head_dim // vg),
            "k_window": (kv_heads, self.window, head_dim), "v_window": (kv_heads, self.window, head_dim),
        }

    def quantized_length(self, n: torch.Tensor) -> torch.Tensor:
        """Tokens in the quantized prefix of a sequence of ``n`` tokens."""
        return torch.clamp(torch.div(n - self.residual, self.group, rounding_mode="floor"), min=0) * self.group


class LayerCache(NamedTuple):
    """One layer's quantized cache tensors (see module doc for shapes)."""

    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_zero: torch.Tensor
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    k_window: torch.Tensor
    v_window: torch.Tensor


def _rows(index: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """Gather along axis 2 of ``tensor`` [B, H, N, ...] at per-row positions ``index`` [B, M]."""
    b, h = tensor.shape[:2]
    idx = index[:, None, :].expand(b, h, index.shape[1])
    idx = idx.reshape(*idx.shape, *([1] * (tensor.dim() - 3))).expand(b, h, index.shape[1], *tensor.shape[3:])
    return torch.gather(tensor, 2, idx)


def dequantized_keys_values(cache: LayerCache, spec: KVQuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantized store expanded to fp32 ``[B, H, C + G, D]`` keys and values (reference only)."""
    g = spec.group
    k_codes = unpack(cache.k_codes, spec.bits).float()
    b, h, slots, d = k_codes.shape
    keys = dequantize(k_codes.reshape(b, h, slots // g, g, d), cache.k_scale[:, :, :, None], cache.k_zero[:, :, :, None])
    vg = spec.value_group(d)
    v_codes = unpack(cache.v_codes, spec.bits).float().reshape(b, h, slots, d // vg, vg)
    values = dequantize(v_codes, cache.v_scale[..., None], cache.v_zero[..., None])
    return keys.reshape(b, h, slots, d), values.reshape(b, h, slots, d)


def sequence_keys_values(cache: LayerCache, new_k: torch.Tensor, new_v: torch.Tensor, start: torch.Tensor,
                         spec: KVQuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of every position ``[0, C + G)`` as attention sees them during a call:
    dequantized below ``n_q``, the window up to ``start``, the new tokens from ``start`` (fp32)."""
    keys, values = dequantized_keys_values(cache, spec)
    slots = keys.shape[2]
    pos = torch.arange(slots, device=start.device)[None, :].expand(start.shape[0], slots)
    n_q = spec.quantized_length(start)[:, None]
    in_window = (pos >= n_q) & (pos < start[:, None])
    is_new = pos >= start[:, None]
    win_idx = torch.clamp(pos - n_q, 0, spec.window - 1)
    new_idx = torch.clamp(pos - start[:, None], 0, new_k.shape[2] - 1)

    def merge(quantized, window, new):
        out = torch.where(in_window[:, None, :, None], _rows(win_idx, window.float()), quantized)
        return torch.where(is_new[:, None, :, None], _rows(new_idx, new.float()), out)

    return merge(keys, cache.k_window, new_k), merge(values, cache.v_window, new_v)


def attend(q: torch.Tensor, cache: LayerCache, new_k: torch.Tensor, new_v: torch.Tensor, start: torch.Tensor,
           scale: float, spec: KVQuantSpec) -> torch.Tensor:
    """Reference attention of ``q`` ``[B, Hq, S, D]`` (positions ``start + i``) over the cache before the
    append plus the ``S`` new tokens ``new_k``/``new_v`` ``[B, H, S, D]``; output in ``q``'s dtype."""
    keys, values = sequence_keys_values(cache, new_k, new_v, start, spec)
    return dense_attention(q, keys, values, start, scale)[0]


def append(cache: LayerCache, new_k: torch.Tensor, new_v: torch.Tensor, start: torch.Tensor,
           spec: KVQuantSpec) -> LayerCache:
    """The cache after appending ``S`` tokens at positions ``start + i`` (functional).

    Stages the window's tokens and the new ones (positions from the old ``n_q``), quantizes
    every whole staged group, writes the groups that leave the window (the others go to
    the scratch group) and refills the window from the staging area.
    """
    g, w = spec.group, spec.window
    s = new_k.shape[2]
    b = start.shape[0]
    n_q_old = spec.quantized_length(start)
    n_q_new = spec.quantized_length(start + s)
    staged_len = -(-(w + s) // g) * g
    t = torch.arange(staged_len, device=start.device)[None, :].expand(b, staged_len)
    pos = n_q_old[:, None] + t
    from_window = pos < start[:, None]
    win_idx = torch.clamp(t, max=w - 1)
    new_idx = torch.clamp(pos - start[:, None], 0, s - 1)

    def stage(window, new):
        return torch.where(from_window[:, None, :, None], _rows(win_idx, window), _rows(new_idx, new.to(window.dtype)))

    staged_k, staged_v = stage(cache.k_window, new_k), stage(cache.v_window, new_v)
    heads, d = staged_k.shape[1], staged_k.shape[3]
    groups = staged_len // g
    k_codes, k_scale, k_zero = quantize(staged_k.float().reshape(b, heads, groups, g, d), spec.bits, dim=3,
                                        stats_dtype=STATS_DTYPE)
    vg = spec.value_group(d)
    v_codes, v_scale, v_zero = quantize(staged_v.float().reshape(b, heads, staged_len, d // vg, vg), spec.bits,
                                        dim=4, stats_dtype=STATS_DTYPE)
    flushed = torch.div(n_q_new - n_q_old, g, rounding_mode="floor")  # whole groups leaving the window
    scratch_group = cache.k_scale.shape[2] - 1
    group_ok = torch.arange(groups, device=start.device)[None, :] < flushed[:, None]
    group_dest = torch.where(group_ok, torch.div(n_q_old, g, rounding_mode="floor")[:, None]
                             + torch.arange(groups, device=start.device)[None, :], scratch_group)
    token_dest = (group_dest[:, :, None] * g + torch.arange(g, device=start.device)).reshape(b, staged_len)

    def scatter(store, dest, values):
        idx = dest[:, None, :].expand(b, heads, dest.shape[1])
        idx = idx.reshape(*idx.shape, *([1] * (store.dim() - 3))).expand(b, heads, dest.shape[1], *store.shape[3:])
        return store.scatter(2, idx, values.to(store.dtype))

    keep = torch.clamp(t[:, :w] + (n_q_new - n_q_old)[:, None], max=staged_len - 1)
    return LayerCache(
        k_codes=scatter(cache.k_codes, token_dest, pack(k_codes.reshape(b, heads, staged_len, d), spec.bits)),
        k_scale=scatter(cache.k_scale, group_dest, k_scale.reshape(b, heads, groups, d)),
        k_zero=scatter(cache.k_zero, group_dest, k_zero.reshape(b, heads, groups, d)),
        v_codes=scatter(cache.v_codes, token_dest, pack(v_codes.reshape(b, heads, staged_len, d), spec.bits)),
        v_scale=scatter(cache.v_scale, token_dest, v_scale.reshape(b, heads, staged_len, d // vg)),
        v_zero=scatter(cache.v_zero, token_dest, v_zero.reshape(b, heads, staged_len, d // vg)),
        k_window=_rows(keep, staged_k),
        v_window=_rows(keep, staged_v),
    )


def allocate(spec: KVQuantSpec, batch: int, kv_heads: int, head_dim: int, max_len: int,
             dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> LayerCache:
    """An empty layer cache (zeros; scales of 1 so unused slots dequantize to 0)."""
    dtypes = {"k_codes": torch.uint8, "v_codes": torch.uint8, "k_window": dtype, "v_window": dtype}
    tensors = {}
    for name, shape in spec.shapes(kv_heads, head_dim, max_len).items():
        fill = 1.0 if name.endswith("scale") else 0
        tensors[name] = torch.full((batch, *shape), fill, dtype=dtypes.get(name, STATS_DTYPE), device=device)
    return LayerCache(**tensors)
