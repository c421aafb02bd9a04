"""``Program``: the captured model — one or more exported graphs plus what the runtime needs to run them.

A decoder LM is captured as two graphs sharing weights:

* ``prefill``: ``(input_ids [B, S], start [B], *cache) -> (logits [B, S, V], *cache)``, S dynamic;
* ``decode``:  the same with S = 1 static.

An encoder has one graph, ``forward``. Each graph's ``GraphRole`` says what it is (tokens per
row, the caches it reads and writes, what it returns), so passes may add graphs (a k-token
verify step, a draft over the first layers) that everything downstream runs by role. Cache tensors are explicit graph inputs and
outputs, described by a ``CacheLayout`` so the runtime can allocate them and a pass
(e.g. KV quantization) can change them.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt
from torch.export import ExportedProgram

BATCH = "batch"
DECODER_INPUTS = ("input_ids", "start")


class CacheTensor(BaseModel):
    """One cache tensor: graph input ``index`` (after the fixed inputs) and output ``index`` (after logits).

    ``shape`` holds ints and the symbol ``"batch"``; ``layer`` is the decoder layer that
    reads and writes it; ``role`` says what it holds (``k``, ``v`` or a pass-specific name).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    layer: int
    role: str
    shape: tuple[int | str, ...]
    dtype: str

    def concrete_shape(self, batch: int) -> tuple[int, ...]:
        """The shape with ``batch`` substituted for the batch symbol."""
        return tuple(batch if d == BATCH else int(d) for d in self.shape)

    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def nbytes(self, batch: int) -> int:
        """Bytes this tensor occupies for ``batch`` sequences."""
        numel = 1
        for d in self.concrete_shape(batch):
            numel *= d
        return numel * torch.empty((), dtype=self.torch_dtype()).element_size()


class CacheLayout(BaseModel):
    """All cache tensors of a decoder program, in graph order, the longest sequence they hold, and what the
    runtime may do with them (declared by whoever makes the layout: capture, or the pass that changes it).

    ``accepts_padding``: tokens written past a row's length are harmless (plain k/v caches hide
    such slots from every query until real tokens overwrite them), so rows may be prefilled
    padded to a common length. ``supports_rollback``: lowering a row's length forgets the
    tokens past it exactly (speculative decoding, an engine releasing a row's tail).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_len: int
    tensors: tuple[CacheTensor, ...]
    accepts_padding: bool = True
    supports_rollback: bool = True

    def allocate(self, batch: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """Zero-filled cache tensors for ``batch`` sequences, in graph order."""
        return [torch.zeros(t.concrete_shape(batch), dtype=t.torch_dtype(), device=device) for t in self.tensors]

    def nbytes(self, batch: int) -> int:
        """Total cache bytes for ``batch`` sequences."""
        return sum(t.nbytes(batch) for t in self.tensors)


class DraftSpec(BaseModel):
    """How the runtime uses a draft graph (pass ``early-exit``). ``length``: tokens drafted per row before
    the whole model checks them in one ``length + 1``-token step. ``confidence``: a row stops drafting at
    a token whose draft top-1 probability is below it (Kangaroo). ``exit_margin``: None = lossless
    self-speculation (drafts are verified: greedy output is the base model's, sampled output has its
    distribution); a number = lossy confidence exit (CALM): a drafted token whose top-1 − top-2
    probability margin is at least this is kept unverified, the first one below it is replaced by the
    whole model's token, and that step writes every layer's KV for all the positions drafted."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    length: PositiveInt
    confidence: float = Field(0.0, ge=0, le=1)
    exit_margin: float | None = Field(None, ge=0)


class GraphRole(BaseModel):
    """What a graph computes, declared by whoever adds the graph (capture, or a pass); the runtime, the
    verifier, example inputs, evaluation and every target read the role, never the graph's name.

    ``tokens``: tokens per row: ``"any"`` (a prefill, an encoder's sequence) or a fixed count
    (1 for a decode step, k for a k-token verify step). ``caches``: names of the cache tensors
    the graph takes after ``(input_ids, start)`` and returns after its outputs, in layout
    order; None = every tensor of the layout (encoders: none). ``outputs``: what the graph
    returns first, in order (``logits``, and e.g. ``hidden`` or ``exit_logits``). ``layers``:
    the blocks it runs; None = all ``ModelInfo.num_layers``. ``from_position``: a scheduled step
    (SkipDecode): it serves rows whose next position is at least this, in place of the whole-cache
    graph of its token count, over the caches of the layers it runs (see ``Program.schedule``);
    None = not scheduled. ``draft``: a draft step of early exit (the first ``layers`` and the model's
    own final norm and LM head, over those layers' caches), used as ``DraftSpec`` says.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    tokens: Literal["any"] | PositiveInt
    caches: tuple[str, ...] | None = None
    outputs: tuple[str, ...] = ("logits",)
    layers: tuple[int, ...] | None = None
    from_position: NonNegativeInt | None = None
    draft: DraftSpec | None = None


PREFILL = GraphRole(tokens="any")
DECODE = GraphRole(tokens=1)
ENCODER = GraphRole(tokens="any", caches=())


class ModelInfo(BaseModel):
    """What was captured: family, architecture and the sizes passes and the runtime need."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["decoder", "encoder"]
    family: str
    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int | None = None
    num_labels: int | None = None
    source: str | None = None
    hf_config: dict = {}

    @classmethod
    def from_hf(cls, model, kind: str, source: str | None) -> "ModelInfo":
        """Info read off a transformers ``PreTrainedModel``."""
        config = model.config
        return cls(
            kind=kind,
            family=config.model_type,
            architecture=type(model).__name__,
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            vocab_size=getattr(config, "vocab_size", None),
            num_labels=config.num_labels if kind == "encoder" else None,
            source=source,
            hf_config=config.to_dict(),
        )


def copy_graph(ep: ExportedProgram) -> ExportedProgram:
    """A copy of ``ep`` whose graph may be edited; weight and constant tensors are shared, not copied."""
    memo = {id(t): t for t in list(ep.state_dict.values()) + list(ep.constants.values())}
    return copy.deepcopy(ep, memo)


@dataclass
class Program:
    """A captured model: named exported graphs, model info and (decoders) the cache layout.

    Passes never mutate a Program in place; they return a new one (``clone`` shares
    weight tensors, copies graphs).
    """

    info: ModelInfo
    graphs: dict[str, ExportedProgram]
    roles: dict[str, GraphRole]
    cache: CacheLayout | None = None
    applied: list[str] = field(default_factory=list)
    folder: Path | None = None  # the saved folder it was loaded from (compiled artifacts travel there)
    trusted_artifacts: bool = False  # whether targets may load the compiled artifacts ``folder`` carries

    def __post_init__(self):
        if set(self.roles) != set(self.graphs):
            raise ValueError(f"every graph needs a role: graphs {sorted(self.graphs)}, roles {sorted(self.roles)}")

    @property
    def is_decoder(self) -> bool:
        return self.info.kind == "decoder"

    def cache_tensors(self, graph: str) -> tuple[CacheTensor, ...]:
        """The cache tensors ``graph`` takes and returns, in its argument order."""
        role = self.roles[graph]
        if self.cache is None or role.caches == ():
            return ()
        if role.caches is None:
            return self.cache.tensors
        by_name = {t.name: t for t in self.cache.tensors}
        return tuple(by_name[name] for name in role.caches)

    def graph_for(self, tokens: int | None = None) -> str:
        """The graph that runs ``tokens`` tokens per row (None: any number) over every cache tensor (encoders:
        none) and returns logits first, not a draft; a graph of that fixed count is preferred over ``any``.
        Raises ``KeyError`` naming what is missing."""
        def serves(role: GraphRole, count) -> bool:
            caches = role.caches is None if self.is_decoder else role.caches == ()
            return caches and role.tokens == count and role.outputs[0] == "logits" and role.draft is None
        for count in ((tokens, "any") if tokens is not None else ("any",)):
            for name, role in self.roles.items():
                if serves(role, count):
                    return name
        raise KeyError(f"no graph of {self.info.architecture} runs {tokens or 'any number of'} tokens per row over the"
                       f" whole cache (roles: {', '.join(f'{n}: {r}' for n, r in self.roles.items())})")

    def schedule(self, tokens: int) -> list[str]:
        """The graphs serving ``tokens`` tokens per row by position: ``graph_for(tokens)`` (from position 0),
        then the scheduled graphs of that count by ``from_position``; each runs a subset of the layers of
        the one before (checked by ``ir.verify``), so a row moving down the list never needs KV an earlier
        step skipped. A program without a schedule gives ``[graph_for(tokens)]``."""
        staged = sorted((role.from_position, name) for name, role in self.roles.items()
                        if role.from_position is not None and role.tokens == tokens)
        return [self.graph_for(tokens), *(name for _, name in staged)]

    def draft_graph(self) -> str | None:
        """The early-exit draft graph (``GraphRole.draft``), if the program has one."""
        return next((name for name, role in self.roles.items() if role.draft is not None), None)

    def graph_layers(self, graph: str) -> list[int]:
        """The blocks ``graph`` runs, ascending: its role's ``layers``, or all ``ModelInfo.num_layers``."""
        layers = self.roles[graph].layers
        return list(range(self.info.num_layers)) if layers is None else sorted(layers)

    def layers(self) -> list[int]:
        """The blocks the program still has: those its whole-cache graph runs (all ``ModelInfo.num_layers``
        unless a pass removed some)."""
        return self.graph_layers(self.graph_for())

    def clone(self) -> "Program":
        """Copy graphs and metadata; weight and constant tensors are shared, not copied."""
        return Program(
            info=self.info.model_copy(deep=True),
            graphs={name: copy_graph(ep) for name, ep in self.graphs.items()},
            roles=dict(self.roles),
            cache=self.cache,
            applied=list(self.applied),
        )

    def fingerprint(self) -> str:
        """A hex digest of everything the graphs compute: their code, roles, cache layout and weight bytes
        (equal fingerprints, equal outputs); for caching what is measured on a program."""
        digest = hashlib.sha256()
        for name, ep in sorted(self.graphs.items()):
            digest.update(f"{name}|{self.roles[name].model_dump_json()}|{ep.graph_module.code}".encode())
            for key, tensor in sorted({**ep.state_dict, **ep.constants}.items()):
                if isinstance(tensor, torch.Tensor):
                    data = tensor.detach().contiguous().cpu()
                    digest.update(f"{key}|{data.dtype}|{tuple(data.shape)}".encode())
                    digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
        digest.update(self.cache.model_dump_json().encode() if self.cache else b"")
        return digest.hexdigest()

    def parameter_count(self) -> int:
        """Distinct parameter elements across all graphs (shared weights counted once)."""
        seen: dict[int, int] = {}
        for ep in self.graphs.values():
            for t in ep.state_dict.values():
                seen[id(t)] = t.numel()
        return sum(seen.values())

    def node_count(self) -> int:
        """call_function nodes across all graphs."""
        return sum(1 for ep in self.graphs.values() for n in ep.graph.nodes if n.op == "call_function")
