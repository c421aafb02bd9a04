"""Compile the decode-attention kernels ahead of time for NVIDIA GPUs, with no GPU present.

``python -m inferpass.kernels.compile_check [--arch 80 90]`` builds every schedule
× dtype variant of ``_partials`` and ``reduce_partials`` (split-KV attention) and the
single/split × dtype × bits variants of ``_quantized_partials`` (fused dequantizing
attention over a quantized cache) to a cubin with ``triton.compile``
and a ``GPUTarget``, and prints registers, spills and shared memory per kernel.
It must run without ``TRITON_INTERPRET`` (interpreted functions are not compiled).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton

from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as triton_compile

from inferpass.kernels import kv_quant_triton, split_kv_triton as kernels

_PTR = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


def _signature(fn, dtype: str) -> dict[str, str]:
    """Argument types: tensors by role, strides and sizes as i64/i32, ``scale`` fp32, constexprs marked."""
    types = {}
    for name in fn.arg_names:
        if name in ("Q", "K", "V", "Out"):
            types[name] = _PTR[dtype]
        elif name in ("PartO", "PartLse", "Lse"):
            types[name] = "*fp32"
        elif name == "Start":
            types[name] = "*i64"
        elif name == "TileCount":
            types[name] = "*i32"
        elif name == "scale":
            types[name] = "fp32"
        elif name.isupper():
            types[name] = "constexpr"
        else:
            types[name] = "i32"
    return types


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers, local (spill) bytes and static shared bytes of a cubin's kernel, read with ``cuobjdump``."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:\d+ SHARED:(\d+) LOCAL:(\d+)", text)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    return {"registers": int(found[1]), "static_shared_bytes": int(found[2]), "local_bytes": int(found[3])}


def compile_all(arch: int, *, head_dim: int = 128, group: int = 4, block_n: int = 64) -> list[dict]:
    """Compile every kernel variant for ``sm_{arch}``; one record per variant (raises on a compile error)."""
    target = GPUTarget("cuda", arch, 32)
    records = []
    for dtype in ("fp32", "fp16", "bf16"):
        for schedule, code in (("single", 0), ("split", 1), ("stream-k", 2)):
            meta = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_M=16, BLOCK_D=head_dim, BLOCK_N=block_n,
                        BLOCK_B=32, SCHEDULE=code)
            variants = [(kernels._partials, {**meta, "PRECISION": "ieee" if dtype == "fp32" else "tf32",
                                             "UPCAST": False, "RECORD": False})]
            if schedule != "single":
                variants.append((kernels.reduce_partials, meta))
            for jit_fn, constexprs in variants:
                compiled = triton_compile(ASTSource(jit_fn, _signature(jit_fn, dtype), constexprs), target=target)
                records.append(_record(arch, jit_fn.__name__, schedule, dtype, compiled))
    for dtype, bits in (("fp32", 4), ("fp16", 2), ("fp16", 4), ("fp16", 8), ("bf16", 4)):
        for schedule in ("single", "split"):
            constexprs = dict(GROUP=group, HEAD_DIM=head_dim, BITS=bits, KEY_GROUP=32, VALUE_GROUP=32, BLOCK_M=16,
                              BLOCK_D=head_dim, BLOCK_X=16, PRECISION="ieee" if dtype == "fp32" else "tf32",
                              UPCAST=False, SINGLE=schedule == "single")
            source = ASTSource(kv_quant_triton._quantized_partials, kv_quant_triton.kernel_signature(dtype), constexprs)
            compiled = triton_compile(source, target=target)
            records.append(_record(arch, f"_quantized_partials[{bits}bit]", schedule, dtype, compiled))
    return records


def _record(arch: int, kernel: str, schedule: str, dtype: str, compiled) -> dict:
    return {"arch": f"sm_{arch}", "kernel": kernel, "schedule": schedule, "dtype": dtype,
            "shared_bytes": compiled.metadata.shared, "cubin_bytes": len(compiled.asm["cubin"]),
            **resource_usage(compiled.asm["cubin"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("compile_check: unset TRITON_INTERPRET (interpreted kernels are not compiled)")
    for arch in args.arch:
        for record in compile_all(arch):
            print(json.dumps(record))


if __name__ == "__main__":
    main()
