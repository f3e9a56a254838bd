"""Packing of documents into rows (mlsys/data/packing.py) and segment-aware models: a packed batch's
per-document losses equal each document's loss run alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mlsys.data.packing import ConcatSource, SegmentSource, first_fit, pieces
from mlsys.spec import DataSpec
from mlsys.models.gpt import GPT, GPTConfig
from mlsys.train.step import cross_entropy, loss_fn


def docs_stream(lengths, vocab=50, seed=0):
    """Documents of the given lengths (EOS = vocab - 1 included) joined into one stream, with their starts."""
    rng = np.random.default_rng(seed)
    docs = [np.append(rng.integers(0, vocab - 1, n - 1), vocab - 1) for n in lengths]
    return np.concatenate(docs).astype(np.uint16), np.cumsum([0, *lengths[:-1]]), np.asarray(lengths)


def test_first_fit_places_every_item_without_overlap():
    lengths = np.array([5, 3, 8, 2, 2, 7, 1, 8, 4])
    row, off, n_rows = first_fit(lengths, 8)
    assert (off + lengths <= 8).all() and n_rows == 6
    for r in range(n_rows):  # items of a row never overlap
        spans = sorted((o, o + n) for o, n, rr in zip(off, lengths, row) if rr == r)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert (row[:3] == [0, 0, 1]).all() and off[1] == 5  # 3 fits after 5 in row 0; 8 opens row 1


def test_pieces_cut_long_documents():
    start, pairs = pieces(np.array([0, 20, 21]), np.array([20, 1, 9]), 8)
    assert start.tolist() == [0, 8, 16, 21] and pairs.tolist() == [8, 8, 3, 8]  # 19 pairs; the 1-token doc: none


def test_segment_rows_follow_the_batch_contract():
    tokens, starts, lengths = docs_stream([5, 12, 3, 30, 2, 7])
    src = SegmentSource(tokens, starts, lengths, seq_len=8, token_bytes=np.ones(50, np.int64))
    seen = 0
    for r in range(len(src)):
        ex = src[r]
        assert {k: v.dtype for k, v in ex.items() if k != "target_bytes"} == dict.fromkeys(
            ["inputs", "targets", "segment_ids", "positions"], np.int32)
        real = ex["segment_ids"] > 0
        seen += real.sum()
        assert ex["target_bytes"] == real.sum() and (ex["targets"][~real] == 0).all()
        for s in np.unique(ex["segment_ids"][real]):  # positions restart at 0 in each segment
            assert (ex["positions"][ex["segment_ids"] == s] == np.arange((ex["segment_ids"] == s).sum())).all()
    assert seen == (lengths - 1).sum()  # every (input, target) pair of every document, once


def test_concat_windows():
    tokens = np.arange(20, dtype=np.uint16)
    src = ConcatSource(tokens, seq_len=4, stride=4)
    assert len(src) == 4 and src[1]["inputs"].tolist() == [4, 5, 6, 7] and src[1]["targets"].tolist() == [5, 6, 7, 8]
    assert len(ConcatSource(tokens, seq_len=4)) == 16


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_packed_losses_equal_each_document_alone(pos_emb):
    cfg = GPTConfig(n_layer=2, n_head=2, d_model=32, block_size=16, pos_emb=pos_emb)
    model = GPT(cfg, DataSpec("lm", (16,), "int32", 50), rngs=nnx.Rngs(0))
    tokens, starts, lengths = docs_stream([5, 9, 3, 20, 6, 4, 11])
    src = SegmentSource(tokens, starts, lengths, seq_len=16)
    fwd = nnx.jit(lambda m, *args: m(*args))  # one compiled program per shape instead of op-by-op dispatch
    rows = [src[r] for r in range(len(src))]
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
    packed = cross_entropy(fwd(model, batch["inputs"], batch["segment_ids"], batch["positions"]), batch["targets"])[0]
    packed = np.asarray(packed)
    # Each piece (a document, or a 16-pair part of a longer one) alone: in a row of its own from position 0, no
    # segment ids; causal attention keeps the rest of that row (zeros) out of its tokens' losses.
    start, pairs = pieces(starts, lengths, 16)
    solo = np.zeros((len(start), 17), np.int32)
    for i, (s, n) in enumerate(zip(start, pairs)):
        solo[i, : n + 1] = tokens[s: s + n + 1]
    solo_loss = np.asarray(cross_entropy(fwd(model, jnp.asarray(solo[:, :-1])), jnp.asarray(solo[:, 1:]))[0])
    alone = [solo_loss[i, :n] for i, n in enumerate(pairs)]
    got = [packed[r][rows[r]["segment_ids"] == k] for r in range(len(rows))
           for k in range(1, rows[r]["segment_ids"].max() + 1)]
    assert sorted(len(g) for g in got) == sorted(len(a) for a in alone)
    for a in alone:  # pieces are matched by their token losses' length and values
        match = min((g for g in got if len(g) == len(a)), key=lambda g: np.abs(g - a).max())
        np.testing.assert_allclose(match, a, atol=1e-5, rtol=0)
    # the training loss weighs real tokens only: padding changes nothing
    mean = float(nnx.jit(loss_fn)(model, batch)[0])
    np.testing.assert_allclose(mean, np.concatenate(alone).mean(), atol=1e-5)
