"""Custom-op providers: installed packages that register the operators a saved graph calls.

A saved folder never names code to import. When a graph calls operators that are not
registered yet (say ``torch.ops.myops.fused_mlp.default``), the provider is looked up among
the installed distributions' entry points in the group ``inferpass.op_providers`` whose
name is the operator namespace (``myops = "mypackage.ops"`` in its ``pyproject.toml``) and
imported; installing a package is the user's act of trust. ``--plugin`` stays the explicit
way to run a user's own module.
"""

from __future__ import annotations

import importlib.metadata

import torch

from inferpass.errors import ModelLoadError

ENTRY_POINT_GROUP = "inferpass.op_providers"


def _resolves(qualified: str) -> bool:
    """True if ``torch.ops.NS.OP.OVERLOAD`` is a registered operator."""
    _, _, namespace, op, *overload = qualified.split(".")
    try:
        packet = getattr(getattr(torch.ops, namespace), op)
        return not overload or hasattr(packet, overload[0])
    except (AttributeError, RuntimeError):
        return False


def ensure_operators(targets: set[str], source: str) -> None:
    """Make every ``torch.ops.NS.OP[.OVERLOAD]`` in ``targets`` resolvable by importing the installed providers
    of the missing namespaces; raises ``ModelLoadError`` naming ``source`` and the ops still missing."""
    missing = {t for t in targets if not _resolves(t)}
    namespaces = sorted({t.split(".")[2] for t in missing})
    providers = {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    for namespace in namespaces:
        if namespace in providers:
            try:
                providers[namespace].load()
            except Exception as exc:
                raise ModelLoadError(f"{source}: the installed op provider {providers[namespace].value!r} for "
                                     f"namespace '{namespace}' failed to import: {exc}") from exc
    missing = sorted(t for t in missing if not _resolves(t))
    if missing:
        raise ModelLoadError(
            f"{source}: the graph calls operators no installed package provides: {', '.join(missing[:5])}; install "
            f"the package that declares an '{ENTRY_POINT_GROUP}' entry point for namespace "
            f"'{missing[0].split('.')[2]}', or import your own module first (--plugin)")
