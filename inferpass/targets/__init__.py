"""Lowering targets. ``get_target`` imports a built-in target's module on first use (see ``base.BUILT_IN``)."""

from inferpass.targets.base import Executable, Target, get_target, target_names

__all__ = ["Executable", "Target", "get_target", "target_names"]
