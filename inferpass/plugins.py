"""Load user plugins (modules that register passes) by module name or by file path."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from inferpass.errors import PipelineError


def load_plugin(module: str, file: str | None = None) -> ModuleType:
    """Import ``module`` (a module name or a ``.py`` path; imported modules are reused), else load ``file``."""
    if module.endswith(".py"):
        module, file = Path(module).stem, module
    if module in sys.modules:
        return sys.modules[module]
    if file is not None:
        wanted = Path(file).resolve()
        for loaded in list(sys.modules.values()):
            origin = getattr(loaded, "__file__", None)
            if origin and Path(origin).resolve() == wanted:
                return loaded  # the same file already imported under another name
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        path = Path(file or module)
        if not path.is_file():
            raise PipelineError(f"cannot import plugin '{module}': {exc}") from exc
    spec = importlib.util.spec_from_file_location(module, path)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[module] = loaded
    spec.loader.exec_module(loaded)
    return loaded
