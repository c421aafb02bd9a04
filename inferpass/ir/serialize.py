"""Save and load a Program as a folder: one ``.pt2`` per graph, ``weights.safetensors``, ``manifest.json``,
and the compiled artifacts of the targets it ran on (``artifacts/<target>/``).

Weights shared between graphs are stored once. Writes are atomic: everything is
written into a temporary sibling folder that is renamed into place at the end, so a
failure leaves no half-written folder behind.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch.export.graph_signature import InputKind

from inferpass.errors import ModelLoadError
from inferpass.ir.program import CacheLayout, ModelInfo, Program

FORMAT = "inferpass-program/1"
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"


def versions() -> dict[str, str]:
    """Versions of the packages a saved program depends on."""
    import transformers

    import inferpass

    return {"inferpass": inferpass.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


@contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target`` that replaces ``target`` only if the block succeeds."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists (pass overwrite=True / --force to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _empty_like(value: torch.Tensor) -> torch.Tensor:
    empty = torch.empty(0, dtype=value.dtype)
    return torch.nn.Parameter(empty, requires_grad=False) if isinstance(value, torch.nn.Parameter) else empty


def save_program(program: Program, out: str | Path, *, extra: dict[str, Any] | None = None, overwrite: bool = False,
                 artifacts: dict[str, dict[str, Path]] | None = None) -> Path:
    """Write ``program`` to folder ``out``; ``extra`` (pipeline, report, ...) goes into the manifest;
    ``artifacts`` (target -> file name -> path) are copied to ``artifacts/<target>/`` for that target to load."""
    out = Path(out)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        carried = {}
        for target, files in (artifacts or {}).items():
            (tmp / "artifacts" / target).mkdir(parents=True)
            for name, path in files.items():
                shutil.copyfile(path, tmp / "artifacts" / target / name)
                carried[f"artifacts/{target}/{name}"] = _sha256(tmp / "artifacts" / target / name)
        stored: dict[str, torch.Tensor] = {}
        key_of: dict[int, str] = {}
        storages: set[int] = set()
        graphs_meta = {}
        for name, ep in program.graphs.items():
            weights = {**ep.state_dict, **ep.constants}
            mapping = {}
            for fqn, tensor in weights.items():
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
            stripped = copy.copy(ep)
            stripped._state_dict = {k: _empty_like(v) for k, v in ep.state_dict.items()}
            stripped._constants = {k: _empty_like(v) for k, v in ep.constants.items()}
            torch.export.save(stripped, tmp / f"{name}.pt2")
            graphs_meta[name] = {"file": f"{name}.pt2", "sha256": _sha256(tmp / f"{name}.pt2"), "weights": mapping}
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
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return out


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a saved program; raises ``ModelLoadError`` if missing or unreadable."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot read inferpass manifest: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise ModelLoadError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    return manifest


def load_program(folder: str | Path) -> Program:
    """Load a folder written by ``save_program``; checksums are verified before anything is deserialized."""
    import inferpass.kernels  # noqa: F401  (registers the custom ops saved graphs may call)

    folder = Path(folder)
    manifest = read_manifest(folder)
    weights_path = folder / manifest["weights"]["file"]
    if not weights_path.is_file() or _sha256(weights_path) != manifest["weights"]["sha256"]:
        raise ModelLoadError(f"{weights_path}: missing or checksum mismatch")
    stored = load_file(str(weights_path))
    graphs = {}
    for name, meta in manifest["graphs"].items():
        path = folder / meta["file"]
        if not path.is_file() or _sha256(path) != meta["sha256"]:
            raise ModelLoadError(f"{path}: missing or checksum mismatch")
        ep = torch.export.load(path)
        kinds = {s.target: s.kind for s in ep.graph_signature.input_specs if s.target is not None}
        for fqn, key in meta["weights"].items():
            tensor = stored[key]
            if kinds.get(fqn) == InputKind.PARAMETER:
                ep._state_dict[fqn] = torch.nn.Parameter(tensor, requires_grad=False)
            elif fqn in ep.state_dict:
                ep._state_dict[fqn] = tensor
            else:
                ep._constants[fqn] = tensor
        graphs[name] = ep
    for name, digest in manifest.get("artifacts", {}).items():
        if not (folder / name).is_file() or _sha256(folder / name) != digest:
            raise ModelLoadError(f"{folder / name}: missing or checksum mismatch")
    cache = CacheLayout.model_validate(manifest["cache"]) if manifest.get("cache") else None
    return Program(info=ModelInfo.model_validate(manifest["info"]), graphs=graphs, cache=cache,
                   applied=manifest["applied"], folder=folder)
