"""One table of correspondences between an mlsys decoder's parameters and a Hugging Face checkpoint's tensors,
read in both directions: import builds each mlsys array (or one device's block of it) from the HF tensors it
names, export cuts the HF tensors back out. Only slicing, placing and transposing: a round trip is exact.

What the table encodes: flax kernels are [in, out], torch nn.Linear weights [out, in] (transposed), GPT-2's
Conv1D weights already [in, out]; mlsys fuses q, k and v into one kernel, side by side; a scanned stack holds every
layer on a leading axis; vocabulary padding (model.vocab_multiple) is zero rows that no HF tensor covers."""

from dataclasses import dataclass
from typing import Callable

import numpy as np

from mlsys.hf.config import check_mappable
from mlsys.models.transformer import ffn_width, kv_heads

# HF tensor names that hold buffers, not weights (older GPT-2 masks, Llama's stored rotary frequencies).
IGNORED = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


@dataclass(frozen=True)
class Piece:
    """One HF tensor and where it sits in one layer's mlsys array."""

    hf: str  # its name, e.g. "model.layers.3.self_attn.k_proj.weight"
    hf_shape: tuple  # its shape in the HF checkpoint
    transpose: bool  # the mlsys block is its transpose (torch nn.Linear weight -> flax kernel)
    at: tuple  # start index, per dimension, of that block in one layer's mlsys array

    @property
    def extent(self) -> tuple:
        """The block's shape in mlsys's layout."""
        return tuple(reversed(self.hf_shape)) if self.transpose else tuple(self.hf_shape)


@dataclass(frozen=True)
class Entry:
    """One mlsys parameter and the HF tensors it is made of."""

    path: tuple  # as nnx.to_flat_state gives it: ("blocks", "attn", "qkv", "kernel") or ("blocks", 0, "attn", ...)
    shape: tuple  # the whole mlsys array's shape (leading layer axis when stacked; padded vocabulary rows)
    stacked: bool  # a scanned stack: shape[0] is the layer count and layers[i] fills [i]
    layers: tuple  # tuple[tuple[Piece, ...], ...]: per layer when stacked, else one


def _linear(name: str, d_in: int, d_out: int, torch_layout: bool, at_out: int = 0) -> Piece:
    """A kernel [d_in, d_out] block from a torch weight [d_out, d_in] or a Conv1D weight [d_in, d_out]."""
    if torch_layout:
        return Piece(name, (d_out, d_in), True, (0, at_out))
    return Piece(name, (d_in, d_out), False, (0, at_out))


def _vector(name: str, n: int, at: int = 0) -> Piece:
    return Piece(name, (n,), False, (at,))


def _gpt2_layer(cfg, i: int) -> dict:
    d, dff, p = cfg.d_model, ffn_width(cfg), f"transformer.h.{i}."
    return {
        ("ln_1", "scale"): ((d,), [_vector(p + "ln_1.weight", d)]),
        ("ln_1", "bias"): ((d,), [_vector(p + "ln_1.bias", d)]),
        ("attn", "qkv", "kernel"): ((d, 3 * d), [_linear(p + "attn.c_attn.weight", d, 3 * d, False)]),
        ("attn", "qkv", "bias"): ((3 * d,), [_vector(p + "attn.c_attn.bias", 3 * d)]),
        ("attn", "proj", "kernel"): ((d, d), [_linear(p + "attn.c_proj.weight", d, d, False)]),
        ("attn", "proj", "bias"): ((d,), [_vector(p + "attn.c_proj.bias", d)]),
        ("ln_2", "scale"): ((d,), [_vector(p + "ln_2.weight", d)]),
        ("ln_2", "bias"): ((d,), [_vector(p + "ln_2.bias", d)]),
        ("mlp", "fc", "kernel"): ((d, dff), [_linear(p + "mlp.c_fc.weight", d, dff, False)]),
        ("mlp", "fc", "bias"): ((dff,), [_vector(p + "mlp.c_fc.bias", dff)]),
        ("mlp", "proj", "kernel"): ((dff, d), [_linear(p + "mlp.c_proj.weight", dff, d, False)]),
        ("mlp", "proj", "bias"): ((d,), [_vector(p + "mlp.c_proj.bias", d)]),
    }


def _llama_layer(cfg, i: int) -> dict:
    d, dff, h, kv = cfg.d_model, ffn_width(cfg), cfg.n_head, kv_heads(cfg)
    hd, p = d // h, f"model.layers.{i}."
    width = (h + 2 * kv) * hd
    q, k, v = (p + f"self_attn.{n}_proj." for n in "qkv")
    out = {
        ("ln_1", "scale"): ((d,), [_vector(p + "input_layernorm.weight", d)]),
        ("attn", "qkv", "kernel"): ((d, width), [_linear(q + "weight", d, h * hd, True),
                                                 _linear(k + "weight", d, kv * hd, True, h * hd),
                                                 _linear(v + "weight", d, kv * hd, True, (h + kv) * hd)]),
        ("attn", "proj", "kernel"): ((h * hd, d), [_linear(p + "self_attn.o_proj.weight", h * hd, d, True)]),
        ("ln_2", "scale"): ((d,), [_vector(p + "post_attention_layernorm.weight", d)]),
        ("mlp", "fc", "kernel"): ((d, dff), [_linear(p + "mlp.up_proj.weight", d, dff, True)]),
        ("mlp", "gate", "kernel"): ((d, dff), [_linear(p + "mlp.gate_proj.weight", d, dff, True)]),
        ("mlp", "proj", "kernel"): ((dff, d), [_linear(p + "mlp.down_proj.weight", dff, d, True)]),
    }
    if cfg.bias or cfg.qkv_bias:
        out[("attn", "qkv", "bias")] = ((width,), [_vector(q + "bias", h * hd), _vector(k + "bias", kv * hd, h * hd),
                                                   _vector(v + "bias", kv * hd, (h + kv) * hd)])
    if cfg.bias:
        out[("attn", "proj", "bias")] = ((d,), [_vector(p + "self_attn.o_proj.bias", d)])
        for name, hf, n in (("fc", "up_proj", dff), ("gate", "gate_proj", dff), ("proj", "down_proj", d)):
            out[("mlp", name, "bias")] = ((n,), [_vector(p + f"mlp.{hf}.bias", n)])
    return out


def padded_vocab(cfg, vocab: int) -> int:
    return -(-vocab // cfg.vocab_multiple) * cfg.vocab_multiple


def mapping(cfg, vocab: int) -> list[Entry]:
    """Every parameter of the mlsys decoder `cfg` (model=gpt: GPT-2 names; model=llama: Llama names, also
    Mistral's and Qwen2's) with the HF tensors it corresponds to. `vocab`: the real vocabulary (model.vocab_size,
    or the data's). Tied embeddings have no lm_head entry."""
    kind = check_mappable(cfg)
    d, rows = cfg.d_model, padded_vocab(cfg, vocab)
    gpt = kind == "gpt2"
    layer = _gpt2_layer if gpt else _llama_layer
    top = "transformer." if gpt else "model."
    entries = [Entry(("wte", "embedding"), (rows, d), False,
                     ((Piece(top + ("wte.weight" if gpt else "embed_tokens.weight"), (vocab, d), False, (0, 0)),),))]
    if gpt:
        entries.append(Entry(("wpe", "embedding"), (cfg.block_size, d), False,
                             ((Piece("transformer.wpe.weight", (cfg.block_size, d), False, (0, 0)),),)))
    per_layer = [layer(cfg, i) for i in range(cfg.n_layer)]
    for sub, (shape, _) in per_layer[0].items():
        pieces = tuple(tuple(table[sub][1]) for table in per_layer)
        if cfg.scan_layers:
            entries.append(Entry(("blocks", *sub), (cfg.n_layer, *shape), True, pieces))
        else:
            entries += [Entry(("blocks", i, *sub), shape, False, (pieces[i],)) for i in range(cfg.n_layer)]
    norm = "transformer.ln_f." if gpt else "model.norm."
    entries.append(Entry(("ln_f", "scale"), (d,), False, ((_vector(norm + "weight", d),),)))
    if gpt:
        entries.append(Entry(("ln_f", "bias"), (d,), False, ((_vector(norm + "bias", d),),)))
    if not cfg.tie_embeddings:
        entries.append(Entry(("lm_head", "kernel"), (d, rows), False,
                             ((Piece("lm_head.weight", (vocab, d), True, (0, 0)),),)))
    return entries


def hf_tensors(entries: list[Entry]) -> dict[str, tuple]:
    """HF tensor name -> its shape, for every tensor the table names."""
    return {p.hf: p.hf_shape for e in entries for layer in e.layers for p in layer}


def piece_of(entry: Entry, layer: int, piece: Piece, value: np.ndarray) -> np.ndarray:
    """Export: the HF tensor `piece` cut out of `value`, the entry's whole mlsys array (host numpy)."""
    v = value[layer] if entry.stacked else value
    block = v[tuple(slice(a, a + n) for a, n in zip(piece.at, piece.extent))]
    return np.ascontiguousarray(block.T if piece.transpose else block)


def _bounds(index: tuple, shape: tuple) -> list[tuple[int, int]]:
    out = []
    for k, n in enumerate(shape):
        s = index[k] if k < len(index) else slice(None)
        start, stop, step = s.indices(n)
        assert step == 1, "device shards are contiguous blocks"
        out.append((start, stop))
    return out


def place(entry: Entry, index: tuple, read: Callable[[str, tuple], np.ndarray], dtype) -> np.ndarray:
    """Import: the block value[index] of the entry's mlsys array (index: slices, as jax.make_array_from_callback
    gives them), built from `read(hf_name, hf_index)`, which returns only that region of an HF tensor. What no
    piece covers (vocabulary padding) is zero."""
    bounds = _bounds(index, entry.shape)
    pieces = entry.layers[0]
    if not entry.stacked and len(pieces) == 1 and all(  # one tensor covers the block: no zeroed copy to fill
            at <= a and b <= at + n for (a, b), at, n in zip(bounds, pieces[0].at, pieces[0].extent)):
        p = pieces[0]
        local = tuple(slice(a - at, b - at) for (a, b), at in zip(bounds, p.at))
        block = read(p.hf, tuple(reversed(local)) if p.transpose else local)
        return (block.T if p.transpose else block).astype(dtype, copy=False)
    out = np.zeros([b - a for a, b in bounds], dtype)
    layers = range(*bounds[0]) if entry.stacked else [None]
    inner = bounds[1:] if entry.stacked else bounds
    for j, layer in enumerate(layers):
        target = out[j] if entry.stacked else out
        for piece in entry.layers[layer if entry.stacked else 0]:
            # The piece's region in this layer's mlsys coordinates, intersected with the requested block.
            lo = [max(a, at) for (a, _), at in zip(inner, piece.at)]
            hi = [min(b, at + n) for (_, b), at, n in zip(inner, piece.at, piece.extent)]
            if any(h <= low for low, h in zip(lo, hi)):
                continue
            local = tuple(slice(low - at, h - at) for low, h, at in zip(lo, hi, piece.at))
            block = read(piece.hf, tuple(reversed(local)) if piece.transpose else local)
            target[tuple(slice(low - a, h - a) for low, h, (a, _) in zip(lo, hi, inner))] = \
                block.T if piece.transpose else block
    return out
