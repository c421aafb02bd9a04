"""Custom ops and their kernels. Importing this package registers every op with its aten reference and CPU kernel
(needed before loading a program) and never imports Triton.

Layers, each importing only those below it: planners and layouts (``decode_plan``, ``attention_state``,
``quantization``, ``quantized_cache``, ``split_kv_reference``, ``quantized_attention``; pure torch), the
Triton kernels (``split_kv_triton``, ``kv_quant_triton``), the Triton ops (``triton_ops``), and op
registration on top: ``split_kv_op`` and ``kv_quant_op`` (on the pure-torch layer only) and ``cuda_kernels``
(the ops' CUDA kernels, on ``triton_ops``). ``cuda_kernels`` is imported by the ``cuda`` target, not here:
without it our ops on CUDA tensors run their aten references.
"""

from inferpass.kernels import split_kv_op  # noqa: F401  (registers inferpass::split_kv_attention)
from inferpass.kernels import kv_quant_op  # noqa: F401  (registers inferpass::kv_quant_attention, kv_quant_append)
