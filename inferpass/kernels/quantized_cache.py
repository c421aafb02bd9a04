"""A KIVI-style quantized KV cache for one layer: layout, functional append, and attention over it.

A sequence of ``n`` tokens (``n`` = the row's ``start`` before a call) is stored in three parts:

* the first ``sink`` tokens (attention sinks, optional) in full precision, for good;
* the *tail* positions ``[sink, n)``, at tail slot ``p - sink``: slots ``[0, n_q)`` quantized and
  ``[n_q, n - sink)`` in a full-precision window, where ``n_q = max(0, (n - sink - R) // G) · G``
  (``R`` = ``residual``, ``G`` = ``group``). The window holds between ``R`` and ``R + G - 1`` tokens
  once the tail is longer than ``R``, so a full group of ``G`` tokens is quantized exactly once,
  when it leaves the window.

Quantization (asymmetric min/max, ``quantization.quantize``):

* keys: per channel, statistics over a group of ``G`` tokens (KIVI);
* values: per token, statistics over groups of ``Gv`` channels of the token's ``H·D`` channels
  (all KV heads of the token, in head order; ``Gv`` = ``value_group``, default ``min(G, D)``,
  a divisor of ``H·D`` that may span heads);
* codes ``b``-bit packed along channels; scales and zeros fp16; window and sinks in the model dtype.

Tensors of one layer (``B`` rows, ``H`` KV heads, ``D`` head dim, ``C`` = ``max_len - sink``
rounded up to ``G``, plus one scratch group that absorbs writes of no group), in ``LayerCache``
order: ``k_codes [B,H,C+G,D·b/8]`` uint8, ``k_scale``/``k_zero [B,H,C/G+1,D]``, ``v_codes`` like
``k_codes``, ``v_scale``/``v_zero [B,1,C+G,H·D/Gv]``, ``k_window``/``v_window [B,H,R+G,D]`` and,
when ``sink > 0``, ``k_sink``/``v_sink [B,H,sink,D]``.

A call with ``S`` new tokens first attends (queries see the sinks, the quantized prefix, the
window and the new tokens, causally; exact in fp32 after dequantization), then appends
(``append``): groups that leave the window are quantized from their full-precision values and
written; codes already written are never touched again. Everything here is functional and
traceable (static shapes apart from ``S``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, field_validator

from inferpass.kernels.quantization import check_bits, dequantize, pack, quantize, unpack
from inferpass.kernels.split_kv_reference import dense_attention

STATS_DTYPE = torch.float16


class KVQuantSpec(BaseModel):
    """``bits`` per code; ``group`` G tokens per key statistics group; ``residual`` R; ``sink`` full-precision
    first tokens; ``value_group`` Gv channels per value statistics group (None: ``min(G, head_dim)``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    bits: int = 4
    group: int = 32
    residual: int = 32
    sink: int = 0
    value_group: int | None = None

    @field_validator("bits")
    @classmethod
    def _bits(cls, value):
        check_bits(value)
        return value

    @field_validator("group", "residual", "value_group")
    @classmethod
    def _positive(cls, value):
        if value is not None and value < 1:
            raise ValueError("must be >= 1")
        return value

    @field_validator("sink")
    @classmethod
    def _non_negative(cls, value):
        if value < 0:
            raise ValueError("must be >= 0")
        return value

    @property
    def window(self) -> int:
        return self.residual + self.group

    def value_group_size(self, kv_heads: int, head_dim: int) -> int:
        """Channels per value statistics group; raises when it does not divide ``kv_heads · head_dim``."""
        group = self.value_group or min(self.group, head_dim)
        if (kv_heads * head_dim) % group or head_dim % (8 // self.bits):
            raise ValueError(f"value group {group} must divide the {kv_heads}×{head_dim} channels of a token, and "
                             f"head_dim {head_dim} must be a multiple of {8 // self.bits} codes per byte")
        return group

    def capacity(self, max_len: int) -> int:
        """Quantized token slots: the ``max_len - sink`` tail positions rounded up to a whole group."""
        return -(-max(max_len - self.sink, 0) // self.group) * self.group

    def shapes(self, kv_heads: int, head_dim: int, max_len: int) -> dict[str, tuple[int, ...]]:
        """Per-row shapes (without the batch axis) of a layer's tensors, in ``LayerCache`` order."""
        c, g = self.capacity(max_len), self.group
        packed = head_dim * self.bits // 8
        value_stats = kv_heads * head_dim // self.value_group_size(kv_heads, head_dim)
        shapes = {
            "k_codes": (kv_heads, c + g, packed), "k_scale": (kv_heads, c // g + 1, head_dim),
            "k_zero": (kv_heads, c // g + 1, head_dim), "v_codes": (kv_heads, c + g, packed),
            "v_scale": (1, c + g, value_stats), "v_zero": (1, c + g, value_stats),
            "k_window": (kv_heads, self.window, head_dim), "v_window": (kv_heads, self.window, head_dim),
        }
        if self.sink:
            shapes |= {"k_sink": (kv_heads, self.sink, head_dim), "v_sink": (kv_heads, self.sink, head_dim)}
        return shapes

    def quantized_length(self, n: torch.Tensor) -> torch.Tensor:
        """Quantized tail slots ``n_q`` of a sequence of ``n`` tokens (tail slot ``t`` is position ``sink + t``)."""
        tail = n - self.sink - self.residual
        return torch.clamp(torch.div(tail, self.group, rounding_mode="floor"), min=0) * self.group


def op_spec(bits: int, group: int, residual: int, sink: int, value_group: int) -> KVQuantSpec:
    """The ``KVQuantSpec`` of the kv-quant ops' trailing int arguments; every implementation builds it here."""
    return KVQuantSpec(bits=bits, group=group, residual=residual, sink=sink, value_group=value_group)


def fused_kernel_supports(spec: KVQuantSpec) -> bool:
    """Whether the fused Triton kernel takes ``spec``: its key group is the tile, a power of two >= 16."""
    return spec.group >= 16 and not spec.group & (spec.group - 1)


class LayerCache(NamedTuple):
    """One layer's quantized cache tensors (see module doc for shapes); the sinks are None when ``sink = 0``."""

    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_zero: torch.Tensor
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    k_window: torch.Tensor
    v_window: torch.Tensor
    k_sink: torch.Tensor | None = None
    v_sink: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        """The tensors that exist (8, or 10 with sinks), in graph order."""
        return [t for t in self if t is not None]


def _rows(index: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """Gather along axis 2 of ``tensor`` [B, H, N, ...] at per-row positions ``index`` [B, M]."""
    b, h = tensor.shape[:2]
    idx = index[:, None, :].expand(b, h, index.shape[1])
    idx = idx.reshape(*idx.shape, *([1] * (tensor.dim() - 3))).expand(b, h, index.shape[1], *tensor.shape[3:])
    return torch.gather(tensor, 2, idx)


def token_channels(x: torch.Tensor, group: int) -> torch.Tensor:
    """``[B, H, N, D]`` -> ``[B, N, H·D/group, group]``: a token's channels across heads, in value groups."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d // group, group)


def head_channels(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of ``token_channels``: ``[B, N, H·D/group, group]`` -> ``[B, H, N, D]``."""
    b, n = x.shape[:2]
    return x.reshape(b, n, heads, -1).transpose(1, 2)


def dequantize_keys(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed key codes ``[B, H, N, D·b/8]`` (N a multiple of the group) and their group statistics
    ``[B, H, N/G, D]`` -> fp32 keys ``[B, H, N, D]``."""
    k = unpack(codes, bits).float()
    b, h, n, d = k.shape
    groups = scale.shape[2]
    return dequantize(k.reshape(b, h, groups, n // groups, d), scale[:, :, :, None], zero[:, :, :, None]).reshape(
        b, h, n, d)


def dequantize_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed value codes ``[B, H, N, D·b/8]`` and per-token statistics ``[B, 1, N, H·D/Gv]`` -> fp32 values
    ``[B, H, N, D]``."""
    v = unpack(codes, bits).float()
    b, h, n, d = v.shape
    group = h * d // scale.shape[-1]
    return head_channels(dequantize(token_channels(v, group), scale[:, 0, :, :, None], zero[:, 0, :, :, None]), h)


def dequantized_keys_values(cache: LayerCache, spec: KVQuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantized store expanded to fp32 ``[B, H, C + G, D]`` keys and values (reference only)."""
    return (dequantize_keys(cache.k_codes, cache.k_scale, cache.k_zero, spec.bits),
            dequantize_values(cache.v_codes, cache.v_scale, cache.v_zero, spec.bits))


def _sink_positions(start: torch.Tensor, new_len: int, sink: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For sink slots ``j < sink``: whether slot ``j`` is one of the call's new tokens, and which one."""
    pos = torch.arange(sink, device=start.device)[None, :]
    is_new = pos >= start[:, None]
    return is_new, torch.clamp(pos - start[:, None], 0, new_len - 1)


def sequence_keys_values(cache: LayerCache, new_k: torch.Tensor, new_v: torch.Tensor, start: torch.Tensor,
                         spec: KVQuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of every position ``[0, sink + C + G)`` as attention sees them during a call (fp32):
    the sinks, dequantized below ``n_q``, the window up to ``start``, the new tokens from ``start``."""
    keys, values = dequantized_keys_values(cache, spec)
    slots = keys.shape[2]
    tail_start = start - spec.sink
    pos = torch.arange(slots, device=start.device)[None, :].expand(start.shape[0], slots)
    n_q = spec.quantized_length(start)[:, None]
    in_window = (pos >= n_q) & (pos < tail_start[:, None])
    is_new = pos >= tail_start[:, None]
    win_idx = torch.clamp(pos - n_q, 0, spec.window - 1)
    new_idx = torch.clamp(pos - tail_start[:, None], 0, new_k.shape[2] - 1)
    sink_new, sink_idx = _sink_positions(start, new_k.shape[2], spec.sink)

    def merge(quantized, window, new, sink):
        out = torch.where(in_window[:, None, :, None], _rows(win_idx, window.float()), quantized)
        out = torch.where(is_new[:, None, :, None], _rows(new_idx, new.float()), out)
        if sink is None:
            return out
        head = torch.where(sink_new[:, None, :, None], _rows(sink_idx, new.float()), sink.float())
        return torch.cat([head, out], dim=2)

    return (merge(keys, cache.k_window, new_k, cache.k_sink), merge(values, cache.v_window, new_v, cache.v_sink))


def attend(q: torch.Tensor, cache: LayerCache, new_k: torch.Tensor, new_v: torch.Tensor, start: torch.Tensor,
           scale: float, spec: KVQuantSpec) -> torch.Tensor:
    """Reference attention of ``q`` ``[B, Hq, S, D]`` (positions ``start + i``) over the cache before the
    append plus the ``S`` new tokens ``new_k``/``new_v`` ``[B, H, S, D]``; output in ``q``'s dtype."""
    keys, values = sequence_keys_values(cache, new_k, new_v, start, spec)
    return dense_attention(q, keys, values, start, scale)[0]


def empty_attention(q: torch.Tensor, *_) -> torch.Tensor:
    """Uninitialized attention output for ``q`` (``attend``'s shape and dtype): the kv-quant attention ops' fake."""
    return torch.empty_like(q)


def append(cache: LayerCache, new_k: torch.Tensor, new_v: torch.Tensor, start: torch.Tensor,
           spec: KVQuantSpec) -> LayerCache:
    """The cache after appending ``S`` tokens at positions ``start + i`` (functional).

    New tokens below ``sink`` go to the sinks. The tail stages the window's tokens and its new
    ones (tail slots from the old ``n_q``), quantizes every whole staged group, writes the groups
    that leave the window (the others go to the scratch group) and refills the window from the
    staging area.
    """
    g, w = spec.group, spec.window
    s = new_k.shape[2]
    b = start.shape[0]
    tail_start = start - spec.sink
    n_q_old = spec.quantized_length(start)
    n_q_new = spec.quantized_length(start + s)
    staged_len = -(-(w + s) // g) * g
    t = torch.arange(staged_len, device=start.device)[None, :].expand(b, staged_len)
    pos = n_q_old[:, None] + t
    from_window = pos < tail_start[:, None]
    win_idx = torch.clamp(t, max=w - 1)
    new_idx = torch.clamp(pos - tail_start[:, None], 0, s - 1)

    def stage(window, new):
        return torch.where(from_window[:, None, :, None], _rows(win_idx, window), _rows(new_idx, new.to(window.dtype)))

    staged_k, staged_v = stage(cache.k_window, new_k), stage(cache.v_window, new_v)
    heads, d = staged_k.shape[1], staged_k.shape[3]
    groups = staged_len // g
    k_codes, k_scale, k_zero = quantize(staged_k.float().reshape(b, heads, groups, g, d), spec.bits, dim=3,
                                        stats_dtype=STATS_DTYPE)
    vg = spec.value_group_size(heads, d)
    v_codes, v_scale, v_zero = quantize(token_channels(staged_v.float(), vg), spec.bits, dim=3,
                                        stats_dtype=STATS_DTYPE)
    flushed = torch.div(n_q_new - n_q_old, g, rounding_mode="floor")  # whole groups leaving the window
    scratch_group = cache.k_scale.shape[2] - 1
    group_ok = torch.arange(groups, device=start.device)[None, :] < flushed[:, None]
    group_dest = torch.where(group_ok, torch.div(n_q_old, g, rounding_mode="floor")[:, None]
                             + torch.arange(groups, device=start.device)[None, :], scratch_group)
    token_dest = (group_dest[:, :, None] * g + torch.arange(g, device=start.device)).reshape(b, staged_len)

    def scatter(store, dest, values):
        rows = store.shape[1]
        idx = dest[:, None, :].expand(b, rows, dest.shape[1])
        idx = idx.reshape(*idx.shape, *([1] * (store.dim() - 3))).expand(b, rows, dest.shape[1], *store.shape[3:])
        return store.scatter(2, idx, values.to(store.dtype))

    def sink_write(sink, new):
        if sink is None:
            return None
        is_new, idx = _sink_positions(start, s, spec.sink)
        return torch.where(is_new[:, None, :, None], _rows(idx, new.to(sink.dtype)), sink)

    keep = torch.clamp(t[:, :w] + (n_q_new - n_q_old)[:, None], max=staged_len - 1)
    return LayerCache(
        k_codes=scatter(cache.k_codes, token_dest, pack(k_codes.reshape(b, heads, staged_len, d), spec.bits)),
        k_scale=scatter(cache.k_scale, group_dest, k_scale.reshape(b, heads, groups, d)),
        k_zero=scatter(cache.k_zero, group_dest, k_zero.reshape(b, heads, groups, d)),
        v_codes=scatter(cache.v_codes, token_dest, pack(head_channels(v_codes, heads), spec.bits)),
        v_scale=scatter(cache.v_scale, token_dest, v_scale[:, None, :, :, 0]),
        v_zero=scatter(cache.v_zero, token_dest, v_zero[:, None, :, :, 0]),
        k_window=_rows(keep, staged_k),
        v_window=_rows(keep, staged_v),
        k_sink=sink_write(cache.k_sink, new_k),
        v_sink=sink_write(cache.v_sink, new_v),
    )


def allocate(spec: KVQuantSpec, batch: int, kv_heads: int, head_dim: int, max_len: int,
             dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> LayerCache:
    """An empty layer cache (zeros; scales of 1 so unused slots dequantize to 0)."""
    dtypes = {"k_codes": torch.uint8, "v_codes": torch.uint8, "k_window": dtype, "v_window": dtype,
              "k_sink": dtype, "v_sink": dtype}
    tensors = {}
    for name, shape in spec.shapes(kv_heads, head_dim, max_len).items():
        fill = 1.0 if name.endswith("scale") else 0
        tensors[name] = torch.full((batch, *shape), fill, dtype=dtypes.get(name, STATS_DTYPE), device=device)
    return LayerCache(**tensors)
