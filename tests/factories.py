"""Random small models of each supported family, and hypothesis strategies over their configs."""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

DECODER_FAMILIES = ("llama", "qwen2", "mistral", "gpt2")
_LLAMA_LIKE = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "mistral": (MistralConfig, MistralForCausalLM)}


def tiny_decoder(family: str = "llama", *, layers: int = 2, kv_heads: int = 2, group: int = 2, head_dim: int = 8,
                 vocab: int = 64, context: int = 64, seed: int = 0, tie: bool = False):
    """A randomly initialised decoder LM of ``family`` in eval mode (fp32, SDPA attention)."""
    torch.manual_seed(seed)
    heads = kv_heads * group
    hidden = heads * head_dim
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=context,
                         bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
        return GPT2LMHeadModel(cfg).eval()
    cfg_cls, model_cls = _LLAMA_LIKE[family]
    cfg = cfg_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                  max_position_embeddings=context, tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0,
                  pad_token_id=0, attn_implementation="sdpa")
    return model_cls(cfg).eval()


def tiny_vit(*, layers: int = 2, heads: int = 2, head_dim: int = 8, image: int = 16, patch: int = 4, labels: int = 10,
             seed: int = 0):
    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=heads * head_dim, num_hidden_layers=layers, num_attention_heads=heads,
                    intermediate_size=4 * heads * head_dim, image_size=image, patch_size=patch, num_channels=1,
                    num_labels=labels, attn_implementation="sdpa")
    return ViTForImageClassification(cfg).eval()


def tiny_bert(*, layers: int = 2, heads: int = 2, head_dim: int = 8, vocab: int = 50, labels: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=heads * head_dim, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=4 * heads * head_dim, max_position_embeddings=64,
                     num_labels=labels, attn_implementation="sdpa")
    return BertForSequenceClassification(cfg).eval()


@st.composite
def decoder_configs(draw, family=None):
    """Keyword arguments for ``tiny_decoder``: family, layers, GQA ratio, head size, vocab, seed."""
    family = family or draw(st.sampled_from(DECODER_FAMILIES))
    kv_heads = draw(st.sampled_from([1, 2]))
    group = 1 if family == "gpt2" else draw(st.sampled_from([1, 2, 3]))
    return dict(
        family=family,
        layers=draw(st.integers(1, 3)),
        kv_heads=kv_heads,
        group=group,
        head_dim=draw(st.sampled_from([4, 8, 16])),
        vocab=draw(st.integers(16, 96)),
        seed=draw(st.integers(0, 2**16)),
    )
