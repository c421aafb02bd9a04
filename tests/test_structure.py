"""Structure recovery maps graphs back to blocks, attention sites, MLPs and residual adds."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from factories import DECODER_FAMILIES, decoder_configs, tiny_bert, tiny_decoder, tiny_vit
from inferpass.capture import capture
from inferpass.errors import UnsupportedModelError
from inferpass.ir.graph_utils import LINEAR_TARGETS, in_scope
from inferpass.ir.structure import recover_structure
from inferpass.ir.verify import check_structure

aten = torch.ops.aten


@pytest.mark.parametrize("family", DECODER_FAMILIES)
@given(data=st.data())
def test_decoder_structure_is_complete(family, data):
    cfg = data.draw(decoder_configs(family=family))
    program = capture(tiny_decoder(**cfg), max_len=16)
    for graph, structure in check_structure(program).items():
        assert [b.index for b in structure.blocks] == list(range(cfg["layers"]))
        for block in structure.blocks:
            site = block.attention
            assert site.attention.target is aten.scaled_dot_product_attention.default
            for proj in (site.q_proj, site.k_proj, site.v_proj, site.o_proj):
                assert proj.target in LINEAR_TARGETS and in_scope(proj, site.scope)
            assert site.fused_qkv == (family == "gpt2")
            assert len(site.rotary) == (0 if family == "gpt2" else 4)  # q*cos, rot(q)*sin, k*cos, rot(k)*sin
            assert sorted(site.cache_writes) == [f"k{block.index}", f"v{block.index}"]
            assert len(block.residual_adds) == 2 and block.output is block.residual_adds[-1]
            assert block.mlp is not None and block.mlp.output in block.mlp.nodes
        assert all(structure.block(b.index) is b for b in structure.blocks)
        with pytest.raises(KeyError, match="no block 99"):
            structure.block(99)
        for prev, nxt in zip(structure.blocks, structure.blocks[1:]):
            assert nxt.input is prev.output
        assert structure.head.target in LINEAR_TARGETS
        assert structure.final_norm, graph


@pytest.mark.parametrize("make", [tiny_vit, tiny_bert])
def test_encoder_structure(make):
    program = capture(make(layers=3))
    structure = check_structure(program)["forward"]
    assert len(structure.blocks) == 3
    for block in structure.blocks:
        assert block.attention.q_proj is not block.attention.k_proj
        assert len(block.residual_adds) == 2


def test_eager_attention_is_rejected_naming_the_block():
    model = tiny_decoder("llama")
    model.config._attn_implementation = "eager"
    with pytest.raises(UnsupportedModelError, match=r"block 0 \(model\.layers\.0\).*attention op"):
        capture(model, max_len=8)


def test_model_without_repeated_blocks_is_rejected():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x)

    ep = torch.export.export(Plain(), (torch.randn(2, 4),))
    with pytest.raises(UnsupportedModelError, match="no repeated transformer blocks"):
        recover_structure(ep, hidden_size=4)


def test_non_transformers_module_is_rejected():
    with pytest.raises(UnsupportedModelError, match="cannot capture Linear"):
        capture(torch.nn.Linear(2, 2))
