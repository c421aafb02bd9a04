"""What ``optimize-model`` uses when not told otherwise: the embedded models, the held-out text, the presets.

Standard library only: ``inferpass.cli`` shows these in ``--help`` before the heavy stack is imported.
"""

import os
from pathlib import Path

DEFAULT_PIPELINES = {  # exact presets per model kind
    "decoder": "dce,cse,drop-unused-params,lean-attention",
    "encoder": "dce,cse,drop-unused-params",
}
TARGETS = ("eager", "cpu", "inductor", "cuda")  # the built-in targets, for --help (the registry is heavy)
MODELS = Path(__file__).parent / "models"
DEFAULT_MODEL = MODELS / "default-lm"
HELDOUT_TEXT = MODELS / "shakespeare-heldout.txt"
CACHE_ENV = "INFERPASS_CACHE"


def default_cache_dir() -> Path:
    """Where compiled artifacts and calibration results are kept: ``$INFERPASS_CACHE``, else
    ``~/.cache/inferpass``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "inferpass")
