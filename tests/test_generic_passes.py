"""Generic exact passes: DCE with a mutation-based purity test, CSE, unused-weight removal."""

import operator

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from factories import decoder_configs, tiny_decoder
from inferpass.capture import capture
from inferpass.ir.examples import example_inputs
from inferpass.passes import Pipeline, get_pass
from inferpass.passes.instruments import graph_text
from inferpass.ir.purity import is_deterministic, is_pure

aten = torch.ops.aten


def _node(graph, target, *args):
    return graph.call_function(target, args)


def test_purity_is_by_mutation_not_by_tags():
    g = torch.fx.Graph()
    q = g.placeholder("q")
    sdpa = _node(g, aten.scaled_dot_product_attention.default, q, q, q)
    inplace = _node(g, aten.add_.Tensor, q, q)
    check = _node(g, aten._assert_async.msg, q, "x")
    item = _node(g, operator.getitem, q, 0)
    rand = _node(g, aten.rand_like.default, q)
    assert sdpa.is_impure()  # torch.fx keeps SDPA: tagged nondeterministic_seeded
    assert is_pure(sdpa) and is_deterministic(sdpa)
    assert not is_pure(inplace) and not is_pure(check)
    assert is_pure(item)
    assert is_pure(rand) and not is_deterministic(rand)


def _outputs_equal(a, b, graph, seed=0):
    inputs = example_inputs(a, graph, seed=seed)
    with torch.no_grad():
        return all(torch.equal(x, y) for x, y in zip(a.graphs[graph].module()(*inputs), b.graphs[graph].module()(*inputs)))


def _apply(program, text):
    for p in Pipeline.parse(text).passes:
        program = p.run(program.clone()).program
    return program


def test_dce_removes_an_unused_attention_and_keeps_mutations():
    program = capture(tiny_decoder("llama", layers=1), max_len=8)
    ep = program.graphs["decode"]
    sdpa = next(n for n in ep.graph.nodes if n.target is aten.scaled_dot_product_attention.default)
    with ep.graph.inserting_after(sdpa):
        dead = ep.graph.call_function(aten.scaled_dot_product_attention.default, sdpa.args, sdpa.kwargs)
        dead.meta["val"] = sdpa.meta["val"]
    before = program.node_count()
    result = get_pass("dce")().run(program)
    assert result.stats["nodes_removed"] == 1 and result.program.node_count() == before - 1
    assert all(n is not dead for n in result.program.graphs["decode"].graph.nodes)


@given(cfg=decoder_configs(), pipeline=st.sampled_from(["dce", "cse", "drop-unused-params", "cse,dce,drop-unused-params"]))
def test_generic_passes_are_bit_exact(cfg, pipeline):
    program = capture(tiny_decoder(**cfg), max_len=12)
    optimized = _apply(program, pipeline)
    for graph in program.graphs:
        assert _outputs_equal(program, optimized, graph, seed=cfg["seed"])


def test_cse_merges_duplicates_and_drop_removes_weights():
    program = capture(tiny_decoder("llama", layers=2), max_len=8)
    cse = get_pass("cse")().run(program.clone())
    assert cse.stats["nodes_merged"] > 0 and cse.program.node_count() < program.node_count()
    dropped = get_pass("drop-unused-params")().run(program.clone())
    # rotary's original_inv_freq is read by nothing in the graph
    assert dropped.stats["weights_removed"] == 2
    assert all("original_inv_freq" not in k for ep in dropped.program.graphs.values() for k in ep.constants)


@pytest.mark.parametrize("name", ["dce", "cse", "drop-unused-params"])
def test_identity_setting_changes_nothing(name):
    program = capture(tiny_decoder("qwen2", layers=1), max_len=8)
    result = get_pass(name)({"graphs": []}).run(program.clone())
    assert not result.changed and graph_text(result.program) == graph_text(program)
