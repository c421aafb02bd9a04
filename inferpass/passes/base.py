"""``Pass``: a named, configured Program -> Program rewrite, exact or approximate, with ordering constraints.

The contract. A pass declares what it ``requires`` of a model (``decoder``, ``encoder``,
``byte-level``; the manager checks before cloning, and the CLI before capture) and selects
what it rewrites the same way as every other pass: graphs by role or name
(``GraphSelection``: None = all, [] = identity) and blocks (``LayerSelection``). It receives a
clone it owns and may change: its graphs (edit, add or drop them, declaring each one's
``GraphRole``), the cache layout (through ``ir.cache_io``, setting the layout's capabilities),
and the block count in ``ModelInfo`` when it removes blocks. It may not change ``applied``
(the manager records the pass), ``folder`` or ``trusted_artifacts``, nor modify weight tensors
in place (they are shared with the input program): it replaces a weight by a new tensor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from inferpass.errors import PipelineError, UnsupportedModelError
from inferpass.ir.program import Program


def _auto_or_positive(value):
    if value != "auto" and value < 1:
        raise ValueError("must be 'auto' or >= 1")
    return value


AutoOrPositive = Annotated[Literal["auto"] | int, AfterValidator(_auto_or_positive)]
"""A config count that is ``auto`` (the pass decides) or a positive int, e.g. split-KV ``splits``."""


def op_count(value: AutoOrPositive) -> int:
    """An ``AutoOrPositive`` as the int an op takes: -1 for ``auto``."""
    return -1 if value == "auto" else value


class PassConfig(BaseModel):
    """Base config: unknown keys are an error; values are validated and frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# Graph selectors by role: each names the graphs whose role matches (captured programs name their graphs alike).
ROLE_SELECTORS = {
    "prefill": lambda role: role.caches != () and role.tokens == "any",
    "decode": lambda role: role.tokens == 1,
    "steps": lambda role: role.tokens != "any",
    "forward": lambda role: role.caches == (),
}
SELECTORS_BY_KIND = {"decoder": ("prefill", "decode", "steps"), "encoder": ("forward",)}


class GraphSelection(PassConfig):
    """``graphs``: which graphs to rewrite, by role (``prefill``: any tokens over the cache, ``decode``: one
    token, ``steps``: a fixed token count, ``forward``: an encoder's) or by name; None = all, [] = identity."""

    graphs: list[str] | None = None


class LayerSelection(PassConfig):
    """``layers``: which blocks to rewrite, by index; None = all, [] = identity."""

    layers: list[int] | None = None


def select_graphs(program: Program, graphs: list[str] | None, pass_name: str) -> list[str]:
    """The names of ``program``'s graphs that ``graphs`` selects (see ``GraphSelection``), in program order."""
    if graphs is None:
        return list(program.graphs)
    chosen = set()
    for item in graphs:
        matches = [n for n, role in program.roles.items() if ROLE_SELECTORS.get(item, lambda r: False)(role)]
        if item in program.graphs:
            matches.append(item)
        if not matches:
            raise PipelineError(f"pass '{pass_name}': no graph '{item}' (graphs: {', '.join(program.graphs)}; "
                                f"role selectors: {', '.join(ROLE_SELECTORS)})")
        chosen.update(matches)
    return [n for n in program.graphs if n in chosen]


def select_layers(program: Program, layers: list[int] | None, pass_name: str) -> list[int]:
    """The block indices ``layers`` selects (None = all ``program.layers()``), checked against them."""
    present = program.layers()
    if layers is None:
        return present
    count = program.info.num_layers
    bad = [i for i in layers if not 0 <= i < count]
    if bad:
        raise PipelineError(f"pass '{pass_name}': layers {bad} out of range (the model has {count}: 0..{count - 1})")
    removed = sorted(set(layers) - set(present))
    if removed:
        raise PipelineError(f"pass '{pass_name}': layers {removed} were removed by an earlier pass "
                            f"(layers left: {present})")
    return sorted(set(layers))


REQUIREMENTS = {  # name -> (test on (model kind, vocabulary size), what it means)
    "decoder": (lambda kind, vocab: kind == "decoder", "a decoder with a KV cache"),
    "encoder": (lambda kind, vocab: kind == "encoder", "an encoder"),
    "byte-level": (lambda kind, vocab: vocab == 256, "a byte-level model (vocabulary 256)"),
}
Requirement = Literal["decoder", "encoder", "byte-level"]


def check_requirements(pass_: "Pass", kind: str, vocab_size: int | None, model: str) -> None:
    """Raise ``UnsupportedModelError`` naming the pass, what it needs and ``model`` if ``pass_.requires`` is
    not met by a ``kind`` model with ``vocab_size``."""
    unmet = [REQUIREMENTS[r][1] for r in sorted(pass_.requires) if not REQUIREMENTS[r][0](kind, vocab_size)]
    if unmet:
        article = "an" if kind[0] in "aeiou" else "a"
        raise UnsupportedModelError(f"pass '{pass_.name}' needs {' and '.join(unmet)}; {model} is {article} {kind}"
                                    + (f" with vocabulary {vocab_size}" if vocab_size else ""))


@dataclass
class PassResult:
    """A pass's output program, whether it changed anything, and pass-specific figures for ``--explain``:
    ``stats`` (name -> value) and ``tables`` (title -> rows, each a dict of column -> value)."""

    program: Program
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


class Pass(ABC):
    """Subclasses set ``name``, ``exact``, ``Config`` and may set ``runs_after``/``runs_before``.

    ``run`` receives a program it owns (the manager passes a clone) and returns a
    ``PassResult``. An exact pass must leave every graph output numerically equal to
    the input program's; an approximate pass documents its error bound.
    """

    name: ClassVar[str]
    exact: ClassVar[bool]
    Config: ClassVar[type[PassConfig]] = PassConfig
    requires: ClassVar[frozenset[Requirement]] = frozenset()
    runs_after: ClassVar[frozenset[str]] = frozenset()
    runs_before: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: PassConfig | dict | None = None):
        if isinstance(config, self.Config):
            self.config = config
            return
        try:
            self.config = self.Config.model_validate(config or {})
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(config)'}: {e['msg']}" for e in exc.errors()
            )
            raise PipelineError(f"pass '{self.name}': bad config: {problems}") from None

    @abstractmethod
    def run(self, program: Program) -> PassResult:
        """Rewrite ``program`` (owned by the pass) and return the result."""

    def exact_within(self) -> int | None:
        """Up to which sequence length (tokens per row) the pass keeps every logit equal to its input's up to
        fp32 rounding: None = any length (exact passes), 0 = none (approximate passes, unless they say
        more). The CLI checks the optimized program against it (``ir.compare``); a pass that changed
        nothing is exact whatever it says."""
        return None if self.exact else 0

    def spec(self) -> str:
        """The pass as a pipeline-string item, e.g. ``layer-skip{layers=[3, 5]}`` (non-default fields only)."""
        fields = self.config.model_dump(exclude_defaults=True, mode="json")
        if not fields:
            return self.name
        body = ",".join(f"{k}={_format_value(v)}" for k, v in fields.items())
        return f"{self.name}{{{body}}}"


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}: {_format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator adding ``cls`` to the pass registry under ``cls.name``."""
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise PipelineError(f"pass name '{cls.name}' is registered twice ({existing.__module__}, {cls.__module__})")
    _REGISTRY[cls.name] = cls
    return cls


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as ``name``; unknown names raise naming the known passes."""
    if name not in _REGISTRY:
        raise PipelineError(f"unknown pass '{name}'; known passes: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def registered_passes() -> list[type[Pass]]:
    """All registered pass classes, by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]
