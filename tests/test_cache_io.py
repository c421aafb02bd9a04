"""Cache I/O surgery: a graph's cache inputs/outputs rewritten from one layout to another, exactly."""

import pytest
import torch
from hypothesis import given, settings

from factories import decoder_configs, tiny_decoder
from inferpass.capture import capture
from inferpass.errors import UnsupportedModelError
from inferpass.ir.cache_io import open_cache_io
from inferpass.ir.examples import example_inputs
from inferpass.ir.program import BATCH, CacheLayout, CacheTensor
from inferpass.ir.verify import verify_program
from inferpass.passes.cache_attention import insert_like


def _run(ep, inputs):
    with torch.no_grad():
        return ep.module()(*inputs)


@settings(max_examples=4)
@given(config=decoder_configs())
def test_adding_a_cache_tensor_keeps_every_other_output_and_places_the_new_one(config):
    """Add a per-row counter cache written as ``counter + start``: the graph takes and returns it in layout
    order (here: first), every old output is bit-identical, and the program still verifies."""
    program = capture(tiny_decoder(**config), max_len=8)
    counter = CacheTensor(name="counter", layer=0, role="counter", shape=(BATCH, 1), dtype="float32")
    layout = CacheLayout(max_len=8, tensors=(counter, *program.cache.tensors))
    new = program.clone()
    for name in ("prefill", "decode"):
        io = open_cache_io(new, name)
        node = io.add_input(counter)
        in_block_0 = io.writes[program.cache.tensors[0].name]  # so structure recovery places it in layer 0
        start = insert_like(in_block_0, torch.ops.aten.unsqueeze.default, (io.start, 1))
        io.write(counter.name, insert_like(in_block_0, torch.ops.aten.add.Tensor, (node, start)))
        new.graphs[name] = io.close(layout.tensors)
    new.cache = layout
    verify_program(new)
    for name in ("prefill", "decode"):
        inputs = example_inputs(program, name)
        counts = torch.full((inputs[0].shape[0], 1), 3.0)
        want = _run(program.graphs[name], inputs)
        got = _run(new.graphs[name], (*inputs[:2], counts, *inputs[2:]))
        assert torch.equal(got[1], counts + inputs[1].unsqueeze(1).float())
        assert all(torch.equal(a, b) for a, b in zip((got[0], *got[2:]), want))


def test_identity_surgery_and_errors():
    program = capture(tiny_decoder("llama", layers=2), max_len=8)
    io = open_cache_io(program.clone(), "decode")
    same = io.close(program.cache.tensors)
    inputs = example_inputs(program, "decode")
    assert all(torch.equal(a, b) for a, b in zip(_run(same, inputs), _run(program.graphs["decode"], inputs)))
    io = open_cache_io(program.clone(), "decode")
    with pytest.raises(UnsupportedModelError, match=r"decode graph: removed cache k0 is still read by"):
        io.close(program.cache.tensors[2:])
    io = open_cache_io(program.clone(), "decode")
    extra = CacheTensor(name="x", layer=0, role="x", shape=(BATCH, 1), dtype="float32")
    with pytest.raises(UnsupportedModelError, match=r"cache tensors \['x'\] have no input or no writer"):
        io.close((*program.cache.tensors, extra))
    wrong = program.clone()
    wrong.roles["prefill"] = wrong.roles["prefill"].model_copy(update={"caches": ("k0",)})
    with pytest.raises(UnsupportedModelError, match="do not match its role's 1 cache tensors"):
        open_cache_io(wrong, "prefill")
