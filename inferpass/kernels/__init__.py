"""Custom ops and their kernels. Importing this package registers every op (needed before loading a program)."""

from inferpass.kernels import split_kv_op  # noqa: F401  (registers inferpass::split_kv_attention)
from inferpass.kernels import kv_quant_op  # noqa: F401  (registers inferpass::kv_quant_attention, kv_quant_append)
