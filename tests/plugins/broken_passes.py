"""Deliberately broken passes: the verifier and debug mode must catch them and write a working repro."""

import torch

from inferpass.ir.graph_utils import refresh
from inferpass.passes import Pass, PassResult, register_pass


def _head(ep):
    return [n for n in ep.graph.nodes if n.target is torch.ops.aten.linear.default][-1]


@register_pass
class CorruptMetadata(Pass):
    """Broken on purpose: records float16 as the LM head's output dtype while it computes float32."""

    name = "test-corrupt-metadata"
    exact = True

    def run(self, program):
        node = _head(program.graphs["decode"])
        val = node.meta["val"]
        with val.fake_mode:
            node.meta["val"] = val.to(torch.float16)
        return PassResult(program, changed=True)


@register_pass
class SilentlyWrong(Pass):
    """Broken on purpose: claims to be exact but doubles the decode logits (well-formed graph)."""

    name = "test-silently-wrong"
    exact = True

    def run(self, program):
        ep = program.graphs["decode"]
        head = _head(ep)
        with ep.graph.inserting_after(head):
            doubled = ep.graph.call_function(torch.ops.aten.mul.Tensor, (head, 2.0))
        head.replace_all_uses_with(doubled, delete_user_cb=lambda u: u is not doubled)
        doubled.meta = dict(head.meta)
        program.graphs["decode"] = refresh(ep)
        return PassResult(program, changed=True)
