"""Which saved folders' compiled artifacts this machine trusts: those it saved itself.

Compiled artifacts (IREE vmfb modules, AOTInductor packages) are native code, so a folder's
artifacts are used only if the user says so (``trust_artifacts=True`` / ``--trust-artifacts``)
or the folder's manifest (which holds every artifact's sha256) is one this machine wrote:
``save_program`` records the manifest's sha256 in a local list, ``$INFERPASS_TRUST_LIST``
(default ``~/.local/share/inferpass/trusted-folders.txt``), one digest a line.
"""

from __future__ import annotations

import os
from pathlib import Path

TRUST_ENV = "INFERPASS_TRUST_LIST"


def trust_list_path() -> Path:
    """``$INFERPASS_TRUST_LIST``, else ``$XDG_DATA_HOME`` (or ``~/.local/share``) ``/inferpass/trusted-folders.txt``."""
    if os.environ.get(TRUST_ENV):
        return Path(os.environ[TRUST_ENV])
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "inferpass" / "trusted-folders.txt"


def is_trusted(manifest_sha256: str) -> bool:
    """True if this machine saved a folder with this manifest."""
    try:
        return manifest_sha256 in trust_list_path().read_text().split()
    except OSError:
        return False


def trust(manifest_sha256: str) -> None:
    """Record a manifest this machine saved (best effort: a read-only home only costs a recompile later)."""
    path = trust_list_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(manifest_sha256 + "\n")
    except OSError:
        pass
