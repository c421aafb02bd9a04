"""The ``cuda`` target without a GPU, and with one.

Here (no GPU): our Triton ops, and the ops' CUDA kernels built on them (``cuda_kernels``), run in
interpreter mode and equal the ops' references; the lowering (Triton ops, in-place cache writes,
device placement) run op by op equals the captured graph, writes the caches it is given and
creates nothing on the wrong device; the same executable compiled by Inductor's CPU backend
equals eager through prefill and 8 decode steps and never allocates a cache-sized buffer in a
decode step; the target names itself when there is no GPU. On a GPU (marker ``gpu``): the target equals eager with decode under CUDA graphs.
"""

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch._inductor.utils import run_and_get_code

from factories import decoder_configs, tiny_decoder
from inferpass.capture import capture
from inferpass.defaults import DEFAULT_PIPELINES
from inferpass.errors import TargetError
from inferpass.kernels import cuda_kernels  # noqa: F401  (registers the ops' CUDA kernels)
from inferpass.kernels.kv_quant_op import KV_QUANT_ATTENTION
from inferpass.kernels.quantized_cache import attend
from inferpass.kernels.split_kv_op import SPLIT_KV_ATTENTION
from inferpass.kernels.split_kv_reference import dense_attention
from inferpass.kernels.triton_ops import kv_quant_attention_op, split_kv_attention_op
from inferpass.passes import PassManager, Pipeline
from inferpass.targets import get_target
from inferpass.targets.cuda import CudaTarget, GraphedDecode
from inferpass.targets.in_place_step import in_place_step
from inferpass.targets.static_shapes import lifted_inputs
from test_kv_quant_kernels import problems
from test_split_kv_attention import decode_problems
from traces import assert_within_quantization_error, trace

LOWERED_PIPELINES = ["", "lean-attention", "kv-quant{bits=4, group=16, residual=16, sink=2}",
                     "lean-attention{schedule=stream-k}, kv-quant{bits=2, group=16, residual=8, layers=[0]}"]
QUANTIZED = "kv-quant{bits=4, group=16, residual=16}"


@given(problem=decode_problems(), schedule=st.sampled_from(["single", "split", "stream-k"]),
       splits=st.integers(-1, 4))
@settings(max_examples=10)
def test_split_kv_triton_op_equals_the_reference(problem, schedule, splits):
    q, k, v, start, scale = problem
    out, lse = split_kv_attention_op(q, k, v, start, scale, schedule, splits if splits else 1, 16)
    want_out, want_lse = dense_attention(q, k, v, start, scale)
    torch.testing.assert_close(out, want_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=2e-5)


@given(problem=problems(), splits=st.integers(-1, 3))
@settings(max_examples=10)
def test_kv_quant_triton_op_equals_the_reference(problem, splits):
    spec, q, cache, new_k, new_v, start, scale = problem
    value_group = spec.value_group_size(cache.k_codes.shape[1], q.shape[-1])
    got = kv_quant_attention_op(q, new_k, new_v, start, cache.tensors(), scale, spec.bits, spec.group,
                                spec.residual, spec.sink, value_group, splits if splits else 1)
    torch.testing.assert_close(got, attend(q, cache, new_k, new_v, start, scale, spec), atol=2e-5, rtol=2e-5)


@given(split_kv=decode_problems(), kv_quant=problems())
@settings(max_examples=6)
def test_the_ops_cuda_kernels_equal_the_references(split_kv, kv_quant):
    q, k, v, start, scale = split_kv
    out, lse = SPLIT_KV_ATTENTION.kernels["cuda"](q, k, v, start, scale, "auto", -1, 16)
    want_out, want_lse = dense_attention(q, k, v, start, scale)
    torch.testing.assert_close(out, want_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=2e-5)
    spec, q, cache, new_k, new_v, start, scale = kv_quant
    value_group = spec.value_group_size(cache.k_codes.shape[1], q.shape[-1])
    got = KV_QUANT_ATTENTION.kernels["cuda"](q, new_k, new_v, start, cache.tensors(), scale, spec.bits, spec.group,
                                             spec.residual, spec.sink, value_group, -1)
    torch.testing.assert_close(got, attend(q, cache, new_k, new_v, start, scale, spec), atol=2e-5, rtol=2e-5)


def _random_inputs(program, graph, batch, seq, seed):
    gen = torch.Generator().manual_seed(seed)
    caches = [t.normal_(generator=gen) if t.is_floating_point() else t.random_(0, 256, generator=gen)
              for t in program.cache.allocate(batch)]
    ids = torch.randint(0, program.info.vocab_size, (batch, seq), generator=gen)
    start = torch.randint(0, program.cache.max_len - seq + 1, (batch,), generator=gen)
    return ids, start, caches


def _ops_in(module):
    return {str(n.target) for n in module.graph.nodes if n.op == "call_function"}


@given(config=decoder_configs(family="llama"), pipeline=st.sampled_from(LOWERED_PIPELINES),
       graph=st.sampled_from(["prefill", "decode"]), batch=st.integers(1, 3), seed=st.integers(0, 2**16))
@settings(max_examples=6)
def test_lowered_step_with_triton_ops_equals_the_graph(config, pipeline, graph, batch, seed):
    program = PassManager(Pipeline.parse(pipeline)).run(capture(tiny_decoder(**config), max_len=48)).program
    ids, start, caches = _random_inputs(program, graph, batch, 5 if graph == "prefill" else 1, seed)
    ep = program.graphs[graph]
    want_logits, *want_caches = ep.module()(ids, start, *caches)
    module = in_place_step(ep, (ids, start, *caches), len(caches), triton=True, device=torch.device("cpu"))
    ops = _ops_in(module)
    assert not any(op.startswith("inferpass.") and not op.endswith("_triton.default") for op in ops), ops
    assert "aten.scatter.src" not in ops
    if "lean-attention" in pipeline and graph == "decode":
        assert "inferpass.split_kv_attention_triton.default" in ops
    if "kv-quant" in pipeline:
        assert "inferpass.kv_quant_attention_triton.default" in ops
    written = [c.clone() for c in caches]
    weights = [t.detach() for _, t in lifted_inputs(ep, "cuda")]
    with torch.no_grad():
        (logits,) = module(*weights, ids, start, *written)  # the written caches are the inputs, in place
    torch.testing.assert_close(logits, want_logits, atol=5e-5, rtol=1e-4)
    for got, want in zip(written, want_caches):  # codes too: the same aten ops quantize, op by op
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)


def test_unsupported_quantized_groups_keep_the_reference():
    program = capture(tiny_decoder("llama", layers=1, head_dim=16, context=32), max_len=32)
    program = PassManager(Pipeline.parse("kv-quant{bits=4, group=8, residual=8}")).run(program).program
    ids, start, caches = _random_inputs(program, "decode", 1, 1, 0)
    module = in_place_step(program.graphs["decode"], (ids, start, *caches), len(caches), triton=True,
                           device=torch.device("cpu"))
    assert not any(op.startswith("inferpass.") for op in _ops_in(module))  # group 8: no fused kernel, aten only
    assert str(KV_QUANT_ATTENTION.overload) not in _ops_in(module)


def test_lowering_creates_every_tensor_on_the_target_device():
    program = PassManager(Pipeline.parse("lean-attention")).run(
        capture(tiny_decoder("llama", layers=2, head_dim=16), max_len=32)).program
    ids, start, caches = _random_inputs(program, "prefill", 2, 4, 0)
    meta = torch.device("meta")
    module = in_place_step(program.graphs["prefill"], (ids, start, *caches), len(caches), triton=True, device=meta)
    weights = [t.to(meta) for _, t in lifted_inputs(program.graphs["prefill"], "cuda")]
    (logits,) = module(*weights, *(t.to(meta) for t in (ids, start, *caches)))  # a cpu tensor would raise here
    assert logits.device == meta and logits.shape == (2, 4, program.info.vocab_size)


@pytest.fixture(scope="module")
def compiled_on_cpu():
    return CudaTarget(device="cpu")


@pytest.mark.parametrize("pipeline", [DEFAULT_PIPELINES["decoder"], "lean-attention{schedule=split}"])
def test_inductor_compiled_steps_equal_eager(compiled_on_cpu, pipeline):
    captured = capture(tiny_decoder("llama", layers=2, head_dim=16, context=64), max_len=64)
    program = PassManager(Pipeline.parse(pipeline)).run(captured).program
    prompts = [list(range(3, 40)), list(range(9, 30))]  # 37 and 21 tokens: prefill buckets 64 and 32
    executable = compiled_on_cpu.compile(program)
    torch.testing.assert_close(trace(executable, prompts), trace(get_target("eager").compile(program), prompts),
                               atol=5e-5, rtol=1e-4)
    assert executable.compiled == 3  # two prefill buckets and the decode step


def test_quantized_cache_stays_within_the_quantization_error(compiled_on_cpu):
    program = capture(tiny_decoder("llama", layers=2, head_dim=16, context=64), max_len=64)
    quantized = PassManager(Pipeline.parse(QUANTIZED)).run(program.clone()).program
    prompts = [list(range(3, 35)), list(range(9, 25))]  # 32 and 16 tokens: one exact prefill piece each
    assert_within_quantization_error(trace(compiled_on_cpu.compile(quantized), prompts), trace(quantized, prompts),
                                     trace(program, prompts))


def test_compiled_decode_writes_only_new_slots(compiled_on_cpu, lm_program):
    program = PassManager(Pipeline.parse(DEFAULT_PIPELINES["decoder"])).run(lm_program.clone()).program
    executable = compiled_on_cpu.compile(program)
    ids, start, caches = _random_inputs(program, "decode", 2, 1, 0)
    want_logits, *want_caches = get_target("eager").compile(program).run("decode", ids, start, *caches)
    written = [c.clone() for c in caches]
    (logits, *returned), code = run_and_get_code(executable.run, "decode", ids, start, *written)
    assert all(r is w for r, w in zip(returned, written))  # the caller's tensors, written in place
    torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(returned, want_caches, atol=1e-4, rtol=1e-4)
    cache_shape = str(tuple(caches[0].shape))
    allocations = [line for line in "\n".join(code).splitlines() if "empty_strided" in line]
    assert allocations and not any(cache_shape in line for line in allocations), cache_shape


def test_without_a_gpu_the_target_names_itself():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(TargetError, match="target 'cuda' needs a CUDA GPU"):
        get_target("cuda")
    done = subprocess.run([sys.executable, "-m", "inferpass.cli", "--target", "cuda", "--out", "unused"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "target 'cuda' needs a CUDA GPU" in done.stderr
    assert "captured" not in done.stdout  # refused before any work


@pytest.mark.gpu
@pytest.mark.parametrize("pipeline", [DEFAULT_PIPELINES["decoder"], "lean-attention{schedule=stream-k}",
                                      "kv-quant{bits=4, group=32, residual=32, value_group=96}"])
def test_cuda_target_equals_eager_with_decode_under_cuda_graphs(lm_program, heldout, pipeline):
    program = PassManager(Pipeline.parse(pipeline)).run(lm_program.clone()).program
    prompts = [list(heldout[:100]), list(heldout[500:537])]
    want = trace(get_target("eager").compile(program), prompts)
    executable = get_target("cuda").compile(program)
    got = trace(executable, prompts)
    tolerance = 1e-3 if "kv-quant" not in pipeline else float((want - trace(
        get_target("eager").compile(lm_program), prompts)).abs().max()) * 2 + 1e-3
    assert (got - want).abs().max() <= tolerance
    decode = [fn for (graph, _), fn in executable.functions.items() if graph == "decode"]
    assert len(decode) == 1 and isinstance(decode[0], GraphedDecode) and decode[0].captures == 1
