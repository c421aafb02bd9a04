"""Lowering targets. Importing this package registers the built-in targets."""

from inferpass.targets import cuda, eager, inductor, iree_cpu  # noqa: F401  (registers the targets)
from inferpass.targets.base import Executable, Target, get_target, target_names

__all__ = ["Executable", "Target", "get_target", "target_names"]
