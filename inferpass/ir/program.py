"""``Program``: the captured model — one or more exported graphs plus what the runtime needs to run them.

A decoder LM has two graphs sharing weights:

* ``prefill``: ``(input_ids [B, S], start [B], *cache) -> (logits [B, S, V], *cache)``, S dynamic;
* ``decode``:  the same with S = 1 static.

An encoder has one graph, ``forward``. Cache tensors are explicit graph inputs and
outputs, described by a ``CacheLayout`` so the runtime can allocate them and a pass
(e.g. KV quantization) can change them.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
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
    """All cache tensors of a decoder program, in graph order, and the longest sequence they hold."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_len: int
    tensors: tuple[CacheTensor, ...]

    def allocate(self, batch: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """Zero-filled cache tensors for ``batch`` sequences, in graph order."""
        return [torch.zeros(t.concrete_shape(batch), dtype=t.torch_dtype(), device=device) for t in self.tensors]

    def nbytes(self, batch: int) -> int:
        """Total cache bytes for ``batch`` sequences."""
        return sum(t.nbytes(batch) for t in self.tensors)

    @property
    def accepts_padding(self) -> bool:
        """Whether tokens written past a row's length are harmless: true for plain k/v caches, where such
        slots are hidden from every query until real tokens overwrite them (not for quantized caches)."""
        return all(t.role in ("k", "v") for t in self.tensors)


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


@dataclass
class Program:
    """A captured model: named exported graphs, model info and (decoders) the cache layout.

    Passes never mutate a Program in place; they return a new one (``clone`` shares
    weight tensors, copies graphs).
    """

    info: ModelInfo
    graphs: dict[str, ExportedProgram]
    cache: CacheLayout | None = None
    applied: list[str] = field(default_factory=list)
    folder: Path | None = None  # the saved folder it was loaded from (compiled artifacts travel there)
    trusted_artifacts: bool = False  # whether targets may load the compiled artifacts ``folder`` carries

    @property
    def is_decoder(self) -> bool:
        return self.info.kind == "decoder"

    def clone(self) -> "Program":
        """Copy graphs and metadata; weight and constant tensors are shared, not copied."""
        graphs = {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")
            for name, ep in self.graphs.items():
                memo = {id(t): t for t in list(ep.state_dict.values()) + list(ep.constants.values())}
                graphs[name] = copy.deepcopy(ep, memo)
        return Program(
            info=self.info.model_copy(deep=True),
            graphs=graphs,
            cache=self.cache,
            applied=list(self.applied),
        )

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
