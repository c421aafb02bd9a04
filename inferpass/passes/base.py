"""``Pass``: a named, configured Program -> Program rewrite, exact or approximate, with ordering constraints."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from inferpass.errors import PipelineError
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


@dataclass
class PassResult:
    """A pass's output program, whether it changed anything, and pass-specific figures for ``--explain``."""

    program: Program
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)


class Pass(ABC):
    """Subclasses set ``name``, ``exact``, ``Config`` and may set ``runs_after``/``runs_before``.

    ``run`` receives a program it owns (the manager passes a clone) and returns a
    ``PassResult``. An exact pass must leave every graph output numerically equal to
    the input program's; an approximate pass documents its error bound.
    """

    name: ClassVar[str]
    exact: ClassVar[bool]
    Config: ClassVar[type[PassConfig]] = PassConfig
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
