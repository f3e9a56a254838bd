"""A decoder-only transformer in the GPT-2 mould: token (+ learned or rotary position) embeddings, pre-norm
blocks of causal self-attention and a GELU MLP with LayerNorm and biases, a final norm, and a (possibly tied)
language-model head. Built from the shared layers in mlsys.models.transformer."""

from dataclasses import dataclass

from mlsys.models.decoder import Decoder, decoder_family
from mlsys.models.family import register
# Re-exported: the names gpt's users imported from here before the layers were shared.
from mlsys.models.transformer import (ATTENTION, POS_EMBS, REMAT, TransformerConfig, first,  # noqa: F401
                                      flops_per_token, segment_mask)


@dataclass
class GPTConfig(TransformerConfig):
    name: str = "gpt"


class GPT(Decoder):
    """GPT-2: learned positions, LayerNorm, GELU MLP, biases, tied embeddings (by default)."""


register(decoder_family("gpt", GPTConfig, GPT))
