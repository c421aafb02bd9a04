"""An out-of-tree plugin, installed as a distribution (see the ``.dist-info`` beside it): the op
``logitscale::scale`` (with its aten reference and fake implementation) and a pass that calls it.

Its ``entry_points.txt`` declares it the ``inferpass.op_providers`` provider of the ``logitscale``
namespace, so a folder whose graphs call the op loads in a fresh process without ``--plugin``.
"""

import torch

from inferpass.ir.graph_utils import refresh
from inferpass.passes import Pass, PassResult, register_pass
from inferpass.passes.base import GraphSelection, select_graphs
from inferpass.passes.cache_attention import insert_like

_LIB = torch.library.Library("logitscale", "DEF")
_LIB.define("scale(Tensor x, float factor) -> Tensor")
_LIB.impl("scale", lambda x, factor: torch.mul(x, factor), "CompositeExplicitAutograd")  # the aten reference
_LIB.impl("scale", lambda x, factor: torch.empty_like(x), "Meta")
SCALE = torch.ops.logitscale.scale.default


class LogitScaleConfig(GraphSelection):
    """factor: what the logits are multiplied by (1.0 = identity)."""

    factor: float = 1.0


@register_pass
class LogitScale(Pass):
    """Multiply every selected graph's logits by ``factor`` through ``logitscale::scale``."""

    name = "test-logit-scale"
    exact = False
    Config = LogitScaleConfig

    def run(self, program):
        for name in select_graphs(program, self.config.graphs, self.name):
            graph = program.graphs[name].graph
            output = next(n for n in reversed(graph.nodes) if n.op == "output")
            logits, *rest = output.args[0]
            scaled = insert_like(output, SCALE, (logits, self.config.factor))
            output.args = ((scaled, *rest),)
            program.graphs[name] = refresh(program.graphs[name])
        return PassResult(program, changed=self.config.factor != 1.0)
