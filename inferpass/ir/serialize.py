"""Save and load a Program as a folder: ``<graph>.json`` per graph, ``weights.safetensors``, ``manifest.json``,
and the compiled artifacts of the targets it ran on (``artifacts/<target>/``).

A folder is untrusted input, so loading it runs nothing from it: graphs are torch.export's
JSON, checked before deserialization (``graph_json``); every tensor (weights and lifted
constants, stored once when graphs share them) is in safetensors; nothing is unpickled;
operators the graphs call come only from installed packages (``op_providers``); compiled
artifacts are native code and are used only for folders this machine saved or when the
caller trusts them (``artifact_trust``), otherwise the target recompiles.

The manifest lists every file's sha256 and carries its own (over its canonical JSON), so
an edited file or manifest is refused; its metadata is also checked against the graphs
(vocabulary, cache layout, ``max_len``, weight shapes). Writes are atomic
(``output_folder.atomic_directory``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

import inferpass.kernels  # noqa: F401  (registers the built-in ops saved graphs call)
from inferpass.errors import ModelLoadError, VerificationError
from inferpass.ir.artifact_trust import is_trusted, trust
from inferpass.ir.graph_json import graph_from_json, graph_to_json, op_targets, parse_graph_json
from inferpass.ir.graph_utils import fake_value, user_inputs
from inferpass.ir.op_providers import ensure_operators
from inferpass.ir.output_folder import FORMAT_PREFIX, MANIFEST, atomic_directory
from inferpass.ir.program import CacheLayout, GraphRole, ModelInfo, Program
from inferpass.ir.verify import check_interface

FORMAT = f"{FORMAT_PREFIX}2"
WEIGHTS = "weights.safetensors"
CHECKSUM = "manifest_sha256"
log = logging.getLogger(__name__)


class _GraphEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str
    sha256: str
    weights: dict[str, str]
    role: GraphRole


class _FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str
    sha256: str


class Manifest(BaseModel):
    """The parts of ``manifest.json`` loading relies on (other keys, e.g. the pipeline and report, pass through)."""

    model_config = ConfigDict(extra="allow")
    format: str
    info: ModelInfo
    cache: CacheLayout | None
    applied: list[str]
    graphs: dict[str, _GraphEntry]
    weights: _FileEntry
    artifacts: dict[str, str]


def versions() -> dict[str, str]:
    """Versions of the packages a saved program depends on."""
    import transformers

    import inferpass

    return {"inferpass": inferpass.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own checksum field."""
    body = {k: v for k, v in manifest.items() if k != CHECKSUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _collect_weights(program: Program) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, str]]]:
    """Every graph's weights and constants stored once (tensors shared between graphs under one key)."""
    stored: dict[str, torch.Tensor] = {}
    key_of: dict[int, str] = {}
    storages: set[int] = set()
    mappings = {}
    for name, ep in program.graphs.items():
        mapping = {}
        for fqn, tensor in {**ep.state_dict, **ep.constants}.items():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"graph '{name}': constant {fqn} is {type(tensor).__name__}, not a tensor")
            key = key_of.get(id(tensor))
            if key is None:
                key = fqn if fqn not in stored else f"{name}/{fqn}"
                data = tensor.detach().contiguous()
                ptr = data.untyped_storage().data_ptr()
                stored[key] = data.clone() if ptr in storages else data
                storages.add(ptr)
                key_of[id(tensor)] = key
            mapping[fqn] = key
        mappings[name] = mapping
    return stored, mappings


def save_program(program: Program, out: str | Path, *, extra: dict[str, Any] | None = None, overwrite: bool = False,
                 artifacts: dict[str, dict[str, Path]] | None = None) -> Path:
    """Write ``program`` to folder ``out``; ``extra`` (pipeline, report, ...) goes into the manifest;
    ``artifacts`` (target -> file name -> path) are copied to ``artifacts/<target>/`` for that target to load.

    ``overwrite`` replaces only an earlier inferpass folder (or an empty one). Raises
    ``OutputError`` (nothing written) when the location is refused or a write fails.
    """
    out = Path(out)
    stored, mappings = _collect_weights(program)
    graph_files = {name: graph_to_json(ep) for name, ep in program.graphs.items()}
    expected = sum(t.numel() * t.element_size() for t in stored.values()) + sum(map(len, graph_files.values()))
    expected += sum(Path(p).stat().st_size for files in (artifacts or {}).values() for p in files.values())
    with atomic_directory(out, overwrite=overwrite, expected_bytes=expected) as tmp:
        carried = {}
        for target, files in (artifacts or {}).items():
            (tmp / "artifacts" / target).mkdir(parents=True)
            for name, path in files.items():
                shutil.copyfile(path, tmp / "artifacts" / target / name)
                carried[f"artifacts/{target}/{name}"] = _sha256(tmp / "artifacts" / target / name)
        graphs_meta = {}
        for name, data in graph_files.items():
            (tmp / f"{name}.json").write_bytes(data)
            graphs_meta[name] = {"file": f"{name}.json", "sha256": _sha256(tmp / f"{name}.json"),
                                 "weights": mappings[name], "role": program.roles[name].model_dump(mode="json")}
        save_file(stored, str(tmp / WEIGHTS))
        manifest = {
            "format": FORMAT,
            "info": program.info.model_dump(mode="json"),
            "cache": program.cache.model_dump(mode="json") if program.cache else None,
            "applied": program.applied,
            "graphs": graphs_meta,
            "weights": {"file": WEIGHTS, "sha256": _sha256(tmp / WEIGHTS)},
            "artifacts": carried,
            "versions": versions(),
            **(extra or {}),
        }
        manifest = json.loads(json.dumps(manifest, default=str))
        manifest[CHECKSUM] = manifest_checksum(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        digest = _sha256(tmp / MANIFEST)
    trust(digest)
    return out


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a saved program, checksum verified; raises ``ModelLoadError`` if missing, unreadable,
    of another format or edited."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot read inferpass manifest: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ModelLoadError(f"{path}: not an inferpass manifest (a JSON object is expected)")
    if manifest.get("format") == f"{FORMAT_PREFIX}1":
        raise ModelLoadError(f"{path}: this folder was saved by an older inferpass as pickled .pt2 archives, which "
                             "are never loaded (unpickling can run code); optimize the source model again")
    if manifest.get("format") != FORMAT:
        raise ModelLoadError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    if manifest.get(CHECKSUM) != manifest_checksum(manifest):
        raise ModelLoadError(f"{path}: the manifest was edited after it was saved (its {CHECKSUM} does not match "
                             "its contents); restore the original or save the model again")
    return manifest


def _checked_file(folder: Path, name: str, sha256: str) -> Path:
    path = folder / name
    if Path(name).is_absolute() or ".." in Path(name).parts or not path.is_file() or _sha256(path) != sha256:
        raise ModelLoadError(f"{path}: missing or checksum mismatch")
    return path


def _spec_kinds(data: dict) -> dict[str, str]:
    """fqn -> ``state_dict`` or ``constants`` for the graph's lifted inputs, from its JSON signature."""
    kinds = {}
    for spec in data["graph_module"]["signature"]["input_specs"]:
        (kind, body), = spec.items()
        if kind == "parameter":
            kinds[body["parameter_name"]] = "parameter"
        elif kind == "buffer":
            kinds[body["buffer_name"]] = "state_dict" if body.get("persistent", True) else "constants"
        elif kind == "tensor_constant":
            kinds[body["tensor_constant_name"]] = "constants"
        elif kind not in ("user_input", "token", "constant_input"):
            raise ModelLoadError(f"graph input of kind '{kind}' is not supported in a saved folder")
    return kinds


def _load_graph(folder: Path, name: str, entry: _GraphEntry, stored: dict[str, torch.Tensor]) -> ExportedProgram:
    path = _checked_file(folder, entry.file, entry.sha256)
    source = str(path)
    data = parse_graph_json(path.read_bytes(), source)
    ensure_operators(op_targets(data), source)
    state_dict, constants = {}, {}
    try:
        kinds = _spec_kinds(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"{source}: malformed graph signature ({exc})") from exc
    if set(kinds) != set(entry.weights):
        raise ModelLoadError(f"{folder / MANIFEST}: graph '{name}' lifts {sorted(set(kinds) ^ set(entry.weights))[:5]} "
                             "differently from its weight map")
    for fqn, key in entry.weights.items():
        if key not in stored:
            raise ModelLoadError(f"{folder / WEIGHTS}: no tensor '{key}' (graph '{name}', {fqn})")
        if kinds[fqn] == "parameter":
            state_dict[fqn] = torch.nn.Parameter(stored[key], requires_grad=False)
        else:
            (constants if kinds[fqn] == "constants" else state_dict)[fqn] = stored[key]
    ep = graph_from_json(data, state_dict, constants, source)
    _check_weight_shapes(ep, name, folder)
    return ep


def _check_weight_shapes(ep: ExportedProgram, name: str, folder: Path) -> None:
    """Every lifted tensor has the shape and dtype its placeholder was traced with."""
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    tensors = {**ep.state_dict, **ep.constants}
    for spec in ep.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT or spec.target not in tensors:
            continue
        val, tensor = fake_value(placeholders[spec.arg.name]), tensors[spec.target]
        if isinstance(val, torch.Tensor) and (tuple(val.shape) != tuple(tensor.shape) or val.dtype != tensor.dtype):
            raise ModelLoadError(f"{folder / WEIGHTS}: graph '{name}' expects {spec.target} as {val.dtype}"
                                 f"{list(val.shape)} but the folder maps it to {tensor.dtype}{list(tensor.shape)}")


def _check_metadata(program: Program, folder: Path) -> None:
    """The manifest's vocabulary, labels, roles, cache layout and ``max_len`` agree with the graphs."""
    where = folder / MANIFEST
    try:
        check_interface(program)
    except VerificationError as exc:
        raise ModelLoadError(f"{where}: the manifest contradicts the graphs: {exc}") from None
    if program.cache is not None:
        graph = program.graph_for()
        seq = fake_value(user_inputs(program.graphs[graph])[0]).shape[1]
        ranges = program.graphs[graph].range_constraints
        upper = ranges[seq.node.expr].upper if isinstance(seq, torch.SymInt) and seq.node.expr in ranges else seq
        if int(upper) != program.cache.max_len:
            raise ModelLoadError(f"{where}: says max_len {program.cache.max_len} but graph '{graph}' was captured for "
                                 f"{int(upper)} positions")


def load_program(folder: str | Path, *, trust_artifacts: bool = False) -> Program:
    """Load a folder written by ``save_program``; nothing in it is executed or unpickled.

    Checksums are verified and the manifest's metadata checked against the graphs before
    the program is returned. Compiled artifacts the folder carries are used only if this
    machine saved the folder or ``trust_artifacts``; otherwise targets recompile (logged).
    Raises ``ModelLoadError`` naming the file at fault.
    """
    folder = Path(folder)
    raw = read_manifest(folder)
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        raise ModelLoadError(f"{folder / MANIFEST}: malformed manifest ({problems})") from exc
    weights_path = _checked_file(folder, manifest.weights.file, manifest.weights.sha256)
    try:
        stored = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"{weights_path}: not a readable safetensors file: {exc}") from exc
    graphs = {name: _load_graph(folder, name, entry, stored) for name, entry in manifest.graphs.items()}
    for name, digest in manifest.artifacts.items():
        _checked_file(folder, name, digest)
    roles = {name: entry.role for name, entry in manifest.graphs.items()}
    program = Program(info=manifest.info, graphs=graphs, roles=roles, cache=manifest.cache, applied=manifest.applied,
                      folder=folder)
    _check_metadata(program, folder)
    program.trusted_artifacts = bool(manifest.artifacts) and (trust_artifacts or is_trusted(_sha256(folder / MANIFEST)))
    if manifest.artifacts and not program.trusted_artifacts:
        log.warning("%s: not using its %d compiled artifacts (native code from a folder this machine did not save); "
                    "targets recompile from the graphs. Pass trust_artifacts=True (--trust-artifacts) to use them",
                    folder, len(manifest.artifacts))
    return program
