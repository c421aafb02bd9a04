"""Passes and the pass manager. Importing this package registers the built-in passes."""

from inferpass.passes import early_exit  # noqa: F401  (registers early-exit)
from inferpass.passes import generic  # noqa: F401  (registers dce, cse, drop-unused-params)
from inferpass.passes import kv_quant  # noqa: F401  (registers kv-quant)
from inferpass.passes import layer_skip  # noqa: F401  (registers layer-skip)
from inferpass.passes import lean_attention  # noqa: F401  (registers lean-attention)
from inferpass.passes.base import Pass, PassConfig, PassResult, get_pass, register_pass, registered_passes
from inferpass.passes.manager import PassFailure, PassManager, PipelineRun
from inferpass.passes.pipeline import Pipeline

__all__ = [
    "Pass",
    "PassConfig",
    "PassFailure",
    "PassManager",
    "PassResult",
    "Pipeline",
    "PipelineRun",
    "get_pass",
    "register_pass",
    "registered_passes",
]
