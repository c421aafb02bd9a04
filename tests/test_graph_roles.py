"""Graphs are run by their declared role, not their name: a program with two graphs of new roles — a 4-token
verify step over every cache, and a one-token draft over the first layer's caches only — verifies, saves and
loads, and runs on every target available here (eager, cpu, inductor, the cuda lowering on the CPU) like eager."""

import copy

import pytest
import torch
from torch import nn
from torch.export import Dim

from factories import tiny_decoder
from inferpass.capture import capture
from inferpass.capture.decoder_step import DecoderStep
from inferpass.errors import VerificationError
from inferpass.ir.program import GraphRole
from inferpass.ir.serialize import load_program, save_program
from inferpass.ir.verify import verify_program
from inferpass.targets import get_target
from inferpass.targets.cuda import CudaTarget
from inferpass.targets.inductor import InductorTarget
from inferpass.targets.iree_cpu import CpuTarget

MAX_LEN = 16


def _first_layers(model: nn.Module, count: int) -> nn.Module:
    """The same model (same parameter tensors) running only its first ``count`` decoder layers."""
    draft = copy.copy(model)
    draft._modules = dict(model._modules)
    inner = copy.copy(model.model)
    inner._modules = dict(model.model._modules)
    inner.layers = nn.ModuleList(list(model.model.layers)[:count])
    draft.model = inner
    return draft


def _export(model: nn.Module, tokens: int, caches: list[torch.Tensor]):
    batch = Dim("batch", min=1, max=64)
    ids, start = torch.zeros(2, tokens, dtype=torch.long), torch.full((2,), 3, dtype=torch.long)
    with torch.no_grad():
        return torch.export.export(DecoderStep(model), (ids, start, *caches),
                                   dynamic_shapes=({0: batch}, {0: batch}, tuple({0: batch} for _ in caches)))


@pytest.fixture(scope="module")
def program():
    model = tiny_decoder("llama", layers=2)
    program = capture(model, max_len=MAX_LEN)
    caches = program.cache.allocate(2)
    program.graphs["verify4"] = _export(model, 4, caches)
    program.roles["verify4"] = GraphRole(tokens=4)
    program.graphs["draft"] = _export(_first_layers(model, 1), 1, caches[:2])
    program.roles["draft"] = GraphRole(tokens=1, caches=("k0", "v0"), layers=(0,))
    return program


def _inputs(tokens: int, caches: list[torch.Tensor]):
    gen = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, 64, (1, tokens), generator=gen)
    start = torch.tensor([5])
    return (ids, start, *(torch.randn(c.shape, generator=gen) for c in caches))


def test_new_roles_verify_and_are_found_by_role(program):
    verify_program(program)
    assert program.graph_for(4) == "verify4" and program.graph_for(1) == "decode" and program.graph_for(3) == "prefill"
    assert [t.name for t in program.cache_tensors("draft")] == ["k0", "v0"]
    broken = program.clone()
    broken.roles["draft"] = GraphRole(tokens=1, caches=("k0", "v0"))  # says all layers, runs one
    with pytest.raises(VerificationError, match="graph 'draft': 1 blocks recovered but its role runs 2"):
        verify_program(broken)
    broken.roles["draft"] = GraphRole(tokens=2, caches=("k0", "v0"), layers=(0,))
    with pytest.raises(VerificationError, match="graph 'draft': takes 1 tokens per row, its role says 2"):
        verify_program(broken)


def test_new_roles_save_load_and_run_on_every_target(program, tmp_path):
    loaded = load_program(save_program(program, tmp_path / "m"))
    assert loaded.roles == program.roles
    verify_program(loaded)
    cases = {"verify4": _inputs(4, program.cache.allocate(1)), "draft": _inputs(1, program.cache.allocate(1)[:2])}
    eager = get_target("eager").compile(program)
    want = {graph: eager.run(graph, *inputs) for graph, inputs in cases.items()}
    targets = [get_target("eager"), CpuTarget(cache_dir=tmp_path / "cpu"), InductorTarget(cache_dir=tmp_path / "aoti"),
               CudaTarget(device="cpu")]  # the cuda target's lowering, compiled for this CPU
    for target in targets:
        executable = target.compile(loaded)
        for graph, inputs in cases.items():
            got = executable.run(graph, *inputs)
            assert len(got) == len(want[graph])
            for a, b in zip(got, want[graph]):
                torch.testing.assert_close(a.cpu(), b, atol=5e-5, rtol=1e-4, msg=f"{target.name} {graph}")
