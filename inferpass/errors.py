"""Error types. Every error names the thing at fault (a path, an op, a pass, a config key)."""


class InferpassError(Exception):
    """Base class for all errors inferpass raises on bad input or broken invariants."""


class ModelLoadError(InferpassError):
    """A model directory is missing, incomplete or corrupt."""


class UnsupportedModelError(InferpassError):
    """The model's architecture, op or structure is not one inferpass can capture or map."""


class PipelineError(InferpassError):
    """A pipeline names an unknown pass, has a bad config, or has an ordering cycle."""


class VerificationError(InferpassError):
    """A program failed verification after a pass."""


class TargetError(InferpassError):
    """A target cannot lower or run a program (unsupported op, dtype or missing toolchain)."""


class OutputError(InferpassError):
    """An output folder cannot be written: bad location, no permission, no space, or not ours to replace."""
