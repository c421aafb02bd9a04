"""``kv-quant``: store the KV cache as KIVI-style low-bit groups with a full-precision recent window.

Source: KIVI (Liu et al. 2024), TECHNIQUES.md §2. For each selected layer, in every
graph (prefill and decode share the cache), the layer's two fp cache tensors become
the eight (ten with sinks) tensors of ``kernels.quantized_cache`` (packed codes, fp16 scales and zeros,
fp windows); its cache writes become ``kv_quant_append`` and its attention
``kv_quant_attention`` (attend over the quantized prefix + window + new tokens, then
append). The Program's ``CacheLayout`` changes accordingly, so the runtime allocates
the packed tensors and ``KV-cache bytes`` in reports shrink.

Approximate: keys/values older than the window are rounded to ``bits`` bits (error
≤ scale/2 per element); the first ``sink`` tokens and the recent window stay exact, so
sequences no longer than ``sink + residual + group`` tokens are exact. On a GPU the
attention is the fused dequantizing split-KV kernel (``kernels.kv_quant_triton``), so it
composes with ``lean-attention``, which handles the layers left unquantized. Identity:
``layers=[]``.
"""

from __future__ import annotations

import operator

from pydantic import Field, model_validator

from inferpass.errors import UnsupportedModelError
from inferpass.ir.cache_io import open_cache_io
from inferpass.ir.graph_utils import fake_value
from inferpass.ir.program import BATCH, CacheLayout, CacheTensor, Program
from inferpass.ir.structure import graph_structure
from inferpass.kernels.decode_plan import cached_plan, planning_workers
from inferpass.kernels.kv_quant_op import KV_QUANT_APPEND, KV_QUANT_ATTENTION
from inferpass.kernels.quantized_cache import STATS_DTYPE, KVQuantSpec, fused_kernel_supports
from inferpass.passes.base import (AutoOrPositive, LayerSelection, Pass, PassResult, op_count, register_pass,
                                  select_layers)
from inferpass.passes.cache_attention import cache_attention, insert_like

_CODE_FIELDS = {"k_codes", "v_codes"}
_STAT_FIELDS = {"k_scale", "k_zero", "v_scale", "v_zero"}


AUTO_VALUE_GROUP_MAX = 128  # KIVI's largest per-token group


def auto_value_group(kv_heads: int, head_dim: int) -> int:
    """``value_group=auto``: the largest divisor of a token's ``kv_heads·head_dim`` channels up to 128.

    Fewer fp16 statistics per token: on the default LM (3×32 channels) that is 96, 2.8× less
    cache than fp16 at 2048 slots where ``min(group, head_dim)`` = 32 gave 2.6×, at equal quality.
    """
    channels = kv_heads * head_dim
    return max(d for d in range(1, min(channels, AUTO_VALUE_GROUP_MAX) + 1) if channels % d == 0)


class KVQuantConfig(LayerSelection):
    """bits (2/4/8), group, residual, sink, value_group: see ``KVQuantSpec`` (value_group auto: chosen per
    model, ``auto_value_group``); layers: layer indices to quantize (None = all, [] = identity);
    bits_per_layer: per-layer bit overrides, e.g. ``{0: 8}``; splits: split-KV programs per (row, KV head)
    of the GPU kernel (auto = Flash-Decoding heuristic). Defaults are the recommended settings (README)."""

    bits: int = 4
    group: int = 32
    residual: int = 32
    sink: int = 0
    value_group: AutoOrPositive = "auto"
    bits_per_layer: dict[int, int] = Field(default_factory=dict)
    splits: AutoOrPositive = "auto"

    @model_validator(mode="after")
    def _valid_specs(self):
        for layer in (None, *self.bits_per_layer):
            self.spec(layer)  # KVQuantSpec checks bits, group, residual, sink and value_group
        return self

    def spec(self, layer: int | None, kv_heads: int | None = None, head_dim: int | None = None) -> KVQuantSpec:
        """The spec of ``layer``; ``value_group=auto`` resolves for a layer of ``kv_heads × head_dim`` channels
        (left to ``KVQuantSpec``'s default without them: for figures that do not involve value groups)."""
        value_group = self.value_group
        if value_group == "auto":
            value_group = auto_value_group(kv_heads, head_dim) if kv_heads and head_dim else None
        return KVQuantSpec(bits=self.bits_per_layer.get(layer, self.bits), group=self.group, residual=self.residual,
                           sink=self.sink, value_group=value_group)


@register_pass
class KVQuant(Pass):
    """Quantize the KV cache of the selected layers (see module doc)."""

    name = "kv-quant"
    exact = False
    Config = KVQuantConfig
    requires = frozenset({"decoder"})
    runs_before = frozenset({"lean-attention"})  # it replaces the SDPA this pass rewrites

    def run(self, program: Program) -> PassResult:
        by_layer = {}
        for t in program.cache.tensors:
            by_layer.setdefault(t.layer, {})[t.role] = t
        with_kv = sorted(k for k, v in by_layer.items() if {'k', 'v'} <= set(v))
        layers = with_kv if self.config.layers is None else select_layers(program, self.config.layers, self.name)
        for layer in layers:
            if set(by_layer.get(layer, {})) != {"k", "v"}:
                raise UnsupportedModelError(f"pass '{self.name}': layer {layer} has no fp k/v cache to quantize "
                                            f"(layers with one: {with_kv})")
            k = by_layer[layer]["k"]
            try:
                heads, dim = int(k.shape[1]), int(k.shape[3])
                self.config.spec(layer, heads, dim).value_group_size(heads, dim)
            except ValueError as err:
                raise UnsupportedModelError(f"pass '{self.name}', layer {layer}: {err}") from err
        if not layers:
            return PassResult(program, changed=False, stats={"layers": 0})
        layout = self.quantized_layout(program.cache, set(layers))
        for name in list(program.graphs):
            program.graphs[name] = self._rewrite(program, name, set(layers), layout)
        before = program.cache.nbytes(1)
        program.cache = layout
        kv_heads, head_dim = (int(n) for n in by_layer[layers[0]]["k"].shape[1::2])
        capacity = max(1, self.config.spec(None).capacity(layout.max_len))  # a plan needs one slot
        splits = op_count(self.config.splits)
        if fused_kernel_supports(self.config.spec(None)):
            plans = {f"plan batch {b}": cached_plan(b, kv_heads, capacity, planning_workers(), "split", splits,
                                                   self.config.group).describe() for b in (1, 8, 32)}
        else:
            plans = {"plan": f"group {self.config.group} is no power of two >= 16: no fused GPU kernel, a GPU runs "
                             "the chunked torch kernel"}
        return PassResult(program, changed=True, stats={
            "layers": len(layers), "value_group": self.config.spec(None, kv_heads, head_dim).value_group,
            "cache_bytes_per_sequence": layout.nbytes(1),
            "compression_vs_before": round(before / layout.nbytes(1), 2), **plans})

    def exact_within(self) -> int:
        """Sequences of at most ``sink + residual + group`` tokens never leave the full-precision slots."""
        return self.config.sink + self.config.residual + self.config.group

    def quantized_layout(self, cache: CacheLayout, layers: set[int]) -> CacheLayout:
        """``cache`` with the fp k/v tensors of ``layers`` replaced by their quantized tensors."""
        tensors = []
        for t in cache.tensors:
            if t.layer not in layers:
                tensors.append(t)
            elif t.role == "k":
                heads, dim = int(t.shape[1]), int(t.shape[3])
                spec = self.config.spec(t.layer, heads, dim)
                for field, shape in spec.shapes(heads, dim, cache.max_len).items():
                    dtype = "uint8" if field in _CODE_FIELDS else (
                        str(STATS_DTYPE).removeprefix("torch.") if field in _STAT_FIELDS else t.dtype)
                    tensors.append(CacheTensor(name=f"{field}{t.layer}", layer=t.layer, role=field,
                                               shape=(BATCH, *shape), dtype=dtype))
        # codes already flushed are never rewritten, so neither padding nor a shorter length may be written over
        return CacheLayout(max_len=cache.max_len, tensors=tuple(tensors), accepts_padding=False,
                           supports_rollback=False)

    def _rewrite(self, program: Program, graph: str, layers: set[int], layout: CacheLayout):
        ep = program.graphs[graph]
        structure = graph_structure(program, graph)
        io = open_cache_io(program, graph)
        output = next(n for n in reversed(ep.graph.nodes) if n.op == "output")
        for block in structure.blocks:
            if block.index not in layers:
                continue
            site = cache_attention(program, block, io.start, f"{graph} graph, block {block.index} ({block.scope})")
            fields = [t for t in layout.tensors if t.layer == block.index]
            cache_nodes = [io.add_input(t) for t in fields]
            kv = fake_value(site.new["k"]).shape
            spec = self.config.spec(block.index, kv[1], kv[3])
            params = (spec.bits, spec.group, spec.residual, spec.sink, spec.value_group_size(kv[1], kv[3]))
            splits = op_count(self.config.splits)
            out = insert_like(site.attention, KV_QUANT_ATTENTION.overload,
                              (site.query, site.new["k"], site.new["v"], io.start, cache_nodes, site.scale, *params,
                               splits))
            site.attention.replace_all_uses_with(out)
            ep.graph.erase_node(site.attention)
            written = insert_like(output, KV_QUANT_APPEND.overload,
                                  (site.new["k"], site.new["v"], io.start, cache_nodes, *params))
            written.meta.update({k: out.meta[k] for k in ("nn_module_stack",) if k in out.meta})
            for i, t in enumerate(fields):
                item = insert_like(output, operator.getitem, (written, i))
                item.meta.update({k: out.meta[k] for k in ("nn_module_stack",) if k in out.meta})
                io.write(t.name, item)
        graph_layers = {t.layer for t in program.cache_tensors(graph)}
        tensors = [t for t in layout.tensors if t.layer in graph_layers]
        if program.roles[graph].caches is not None:
            program.roles[graph] = program.roles[graph].model_copy(update={"caches": tuple(t.name for t in tensors)})
        return io.close(tensors)
