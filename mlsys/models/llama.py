"""The Llama family: RMSNorm, SwiGLU MLP, grouped-query attention (n_kv_head), rotary embeddings (optionally with
Llama 3's frequency scaling), no biases, tied or untied embeddings. The same shared layers, logical axis names and
parameter paths as gpt, so every mesh, LoRA target, export and the KV cache work for it as for gpt."""

from dataclasses import dataclass

from mlsys.models.decoder import Decoder, decoder_family
from mlsys.models.family import register
from mlsys.models.transformer import TransformerConfig


@dataclass
class LlamaConfig(TransformerConfig):
    name: str = "llama"
    n_kv_head: int = 2
    pos_emb: str = "rope"
    norm: str = "rms"
    mlp: str = "swiglu"
    bias: bool = False
    tie_embeddings: bool = False
    rope_base: float = 500000.0  # Llama 3's
    norm_eps: float = 1e-5


class Llama(Decoder):
    """Llama: rotary positions, RMSNorm, SwiGLU, grouped-query attention, no biases."""


register(decoder_family("llama", LlamaConfig, Llama))
