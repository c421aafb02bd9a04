"""The custom-op registry: reference, fake impl for export, decomposition to aten, device kernel slots."""

import pytest
import torch

from inferpass.errors import InferpassError
from inferpass.ir import ops


def _reference(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    return x + alpha * y


SCALE_ADD = ops.define_op(
    "test_scale_add",
    "(Tensor x, Tensor y, float alpha) -> Tensor",
    reference=_reference,
    fake=lambda x, y, alpha: torch.empty_like(x),
)
ATTN = ops.define_op(
    "test_attention",
    "(Tensor q, Tensor k, Tensor v) -> Tensor",
    reference=lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v),
    fake=lambda q, k, v: torch.empty_like(q),
    role="attention",
)


class UsesOp(torch.nn.Module):
    def forward(self, x, y):
        return torch.ops.inferpass.test_scale_add(x, y, 0.5) * 2


def test_op_exports_runs_and_decomposes_to_reference():
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    ep = torch.export.export(UsesOp(), (x, y), dynamic_shapes=({0: torch.export.Dim("b")}, {0: torch.export.Dim("b")}))
    assert any(n.target is SCALE_ADD.overload for n in ep.graph.nodes)
    want = (x + 0.5 * y) * 2
    torch.testing.assert_close(ep.module()(x, y), want)
    lowered = ep.run_decompositions(ops.reference_decompositions())
    assert not any(str(n.target).startswith("inferpass.") for n in lowered.graph.nodes)
    torch.testing.assert_close(lowered.module()(x, y), want)


def test_device_kernel_slot_overrides_reference():
    calls = []

    def kernel(x, y, alpha):
        calls.append(alpha)
        return _reference(x, y, alpha)

    ops.register_kernel("test_scale_add", "cpu", kernel)
    x = torch.ones(2)
    torch.testing.assert_close(torch.ops.inferpass.test_scale_add(x, x, 3.0), torch.full((2,), 4.0))
    assert calls == [3.0] and ops.get_op("test_scale_add").kernels["cpu"] is kernel


def test_registry_errors_and_roles():
    with pytest.raises(InferpassError, match="already defined"):
        ops.define_op("test_scale_add", "(Tensor x) -> Tensor", reference=lambda x: x, fake=lambda x: x)
    with pytest.raises(InferpassError, match="unknown op inferpass::nope; registered: .*test_scale_add"):
        ops.get_op("nope")
    assert ATTN.overload in ops.attention_targets()
    assert SCALE_ADD.overload not in ops.attention_targets()
    names = [s.name for s in ops.registered_ops()]
    assert names == sorted(names) and {"test_attention", "test_scale_add"} <= set(names)
