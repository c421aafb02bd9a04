"""``Pipeline``: an ordered list of configured passes, from Python, a string or a YAML/JSON file.

String form: ``"layer-skip{layers=[3,5]},kv-quant{bits=4},lean-attention"`` — items
separated by top-level commas, each ``name`` or ``name{key=value,...}`` with values in
YAML flow syntax (``key=`` with no value is an error: leave the key out for its default).
Each pass appears at most once (a repeat is a duplicate, or a conflict when the configs
differ): ordering constraints name passes, so a repeated one has no defined place.
Ordering constraints (``runs_after``/``runs_before``) are sorted with networkx, keeping
the written order where no constraint applies; a cycle is an error naming the passes in it.
``check_model`` validates requirements and graph selections against a model before capture.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import networkx as nx
import yaml

from inferpass.errors import PipelineError
from inferpass.passes.base import SELECTORS_BY_KIND, Pass, check_requirements, get_pass


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    parts, depth, quote, current = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "{[(":
            depth += 1
        elif ch in "}])":
            depth -= 1
            if depth < 0:
                raise PipelineError(f"unbalanced '{ch}' in pipeline string: {text!r}")
        elif ch == sep and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    if depth != 0 or quote:
        raise PipelineError(f"unbalanced brackets or quotes in pipeline string: {text!r}")
    parts.append("".join(current).strip())
    return [p for p in parts if p]


def _parse_item(item: str) -> tuple[str, dict[str, Any]]:
    if "{" not in item:
        return item.strip(), {}
    name, _, rest = item.partition("{")
    if not rest.endswith("}"):
        raise PipelineError(f"pass item {item!r}: config must end with '}}'")
    options: dict[str, Any] = {}
    for pair in _split_top_level(rest[:-1]):
        key, eq, raw = pair.partition("=")
        if not eq or not key.strip():
            raise PipelineError(f"pass '{name.strip()}': expected key=value, got {pair!r}")
        if not raw.strip():
            raise PipelineError(f"pass '{name.strip()}': '{key.strip()}=' has no value "
                                "(leave the key out for its default)")
        try:
            options[key.strip()] = yaml.safe_load(raw.strip())
        except yaml.YAMLError as exc:
            raise PipelineError(f"pass '{name.strip()}': cannot parse value of '{key.strip()}': {raw!r}") from exc
    return name.strip(), options


class Pipeline:
    """Configured passes in execution order (constraints applied)."""

    def __init__(self, passes: list[Pass]):
        _check_unique(passes)
        self.passes = _ordered(passes)

    @classmethod
    def from_specs(cls, specs: list[tuple[str, dict[str, Any]] | str]) -> "Pipeline":
        """Build from ``[name | (name, config)]``; unknown names and bad configs raise ``PipelineError``."""
        passes = []
        for spec in specs:
            name, options = (spec, {}) if isinstance(spec, str) else spec
            passes.append(get_pass(name)(options))
        return cls(passes)

    @classmethod
    def parse(cls, text: str) -> "Pipeline":
        """Build from the string form; the empty string is the empty (identity) pipeline."""
        return cls.from_specs([_parse_item(item) for item in _split_top_level(text or "")])

    @classmethod
    def from_file(cls, path: str | Path) -> "Pipeline":
        """Build from YAML or JSON: a list of names / ``{name, config}`` maps, or ``{passes: [...]}``."""
        path = Path(path)
        try:
            text = path.read_text()
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise PipelineError(f"{path}: cannot read pipeline file: {exc}") from exc
        if isinstance(data, dict):
            data = data.get("passes")
        if not isinstance(data, list):
            raise PipelineError(f"{path}: expected a list of passes (or a 'passes:' list)")
        specs = []
        for entry in data:
            if isinstance(entry, str):
                specs.append(entry)
            elif isinstance(entry, dict) and "name" in entry and set(entry) <= {"name", "config"}:
                specs.append((entry["name"], entry.get("config") or {}))
            else:
                raise PipelineError(f"{path}: bad pass entry {entry!r}; expected a name or {{name, config}}")
        return cls.from_specs(specs)

    @classmethod
    def load(cls, text_or_path: str | None) -> "Pipeline":
        """A pipeline from a file path (``.yaml``/``.yml``/``.json``) or a pipeline string."""
        if text_or_path and Path(text_or_path).suffix in {".yaml", ".yml", ".json"}:
            return cls.from_file(text_or_path)
        return cls.parse(text_or_path or "")

    def check_model(self, kind: str, vocab_size: int | None, model: str) -> None:
        """Before any capture: every pass's requirements hold for a ``kind`` model with ``vocab_size``
        (``UnsupportedModelError``), and every ``graphs`` selection names graphs such a model has
        (``PipelineError``); ``model`` describes the model in messages."""
        graphs = SELECTORS_BY_KIND[kind]
        for p in self.passes:
            check_requirements(p, kind, vocab_size, model)
            unknown = [g for g in getattr(p.config, "graphs", None) or [] if g not in graphs]
            if unknown:
                raise PipelineError(f"pass '{p.spec()}': no graph {', '.join(map(repr, unknown))} in {model} "
                                    f"(its graphs: {', '.join(graphs)})")

    def to_string(self) -> str:
        """The pipeline string that rebuilds this pipeline."""
        return ",".join(p.spec() for p in self.passes)

    def __len__(self) -> int:
        return len(self.passes)


def _check_unique(passes: list[Pass]) -> None:
    first: dict[str, Pass] = {}
    for p in passes:
        seen = first.setdefault(p.name, p)
        if seen is p:
            continue
        if seen.config == p.config:
            raise PipelineError(f"pass '{p.spec()}' is listed twice; list it once")
        raise PipelineError(f"conflicting configs for pass '{p.name}': '{seen.spec()}' and '{p.spec()}'; "
                            "list it once with the config you want")


def _ordered(passes: list[Pass]) -> list[Pass]:
    graph = nx.DiGraph()
    graph.add_nodes_from(range(len(passes)))
    for i, a in enumerate(passes):
        for j, b in enumerate(passes):
            if i != j and (b.name in a.runs_after or a.name in b.runs_before):
                graph.add_edge(j, i)
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        return [passes[i] for i in nx.lexicographical_topological_sort(graph, key=lambda i: i)]
    names = [passes[u].name for u, _ in cycle] + [passes[cycle[0][0]].name]
    raise PipelineError(f"pass ordering cycle: {' -> '.join(names)}")
