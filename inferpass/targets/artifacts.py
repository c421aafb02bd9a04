"""Compiled artifacts on disk, found by key: a per-user cache plus the folders a saved program carries.

A key is a hash of everything a compiled artifact depends on (the graph's code, the
call shapes and dtypes, the compiler's version and flags), never of weights: targets
pass weights as arguments, so one artifact serves every model with the same graph.
Writes are atomic (temporary file, then rename); a saved program folder holds its
artifacts under ``artifacts/<target>/``, where ``load_program`` + the target find
them again without compiling.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from inferpass.defaults import default_cache_dir


def artifact_key(*parts) -> str:
    """A stable hex key of ``parts`` (strings, numbers, and JSON-able lists/dicts of them)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class ArtifactStore:
    """Artifacts of one target: read from ``carried`` folders first, then from (and written to) ``cache``."""

    def __init__(self, target: str, cache: str | Path | None = None, carried: list[Path] | None = None):
        self.cache = Path(cache or default_cache_dir()) / target
        self.carried = list(carried or [])
        self.used: dict[str, Path] = {}  # file name -> where it was found or written, for saving with a program

    def find(self, name: str) -> Path | None:
        """The stored file ``name``, or None."""
        for folder in (*self.carried, self.cache):
            path = folder / name
            if path.is_file():
                self.used[name] = path
                return path
        return None

    def put(self, name: str, data: bytes) -> Path:
        """Store ``data`` as ``name`` in the cache atomically; returns its path."""
        self.cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=self.cache)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        path = self.cache / name
        os.replace(tmp, path)
        self.used[name] = path
        return path
