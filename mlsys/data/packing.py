"""Packing tokenized documents into fixed-length training rows (`data.packing`).

The batch contract between language-model data and models. Every LM batch holds
  inputs        int32 [B, T]   token ids
  targets       int32 [B, T]   the next token of each position
  target_bytes  int32 [B]      UTF-8 bytes of the text the row's real targets cover (bits per byte; absent where
                               the tokenizer cannot tell, e.g. data=synthetic)
and with `data.packing=segments` also
  segment_ids   int32 [B, T]   1, 2, ... for the documents placed in the row, 0 for padding
  positions     int32 [B, T]   each token's position inside its own document (restarting at 0)
A model given `segment_ids` must attend only within a segment (causally) and place tokens by `positions`
(mlsys.models.gpt.segment_mask does both for GPT); the loss (mlsys.train.step.forward) gives padding — segment id 0
— weight 0. Without `segment_ids` a row is one causal sequence (data.packing=concat: documents joined with EOS,
windows cut anywhere, as nanoGPT).

`segments` places documents first-fit into rows of T (input, target) pairs: a document of n tokens (its EOS
included) gives n - 1 pairs; one longer than T + 1 tokens is cut into pieces of T pairs, each its own segment.
"""

import numpy as np

from mlsys.errors import DataError


def pieces(starts: np.ndarray, lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, pairs) of every piece: documents (token spans) cut into runs of at most seq_len (input, target) pairs.
    A piece of p pairs reads tokens [start, start + p + 1). One-token documents give no pair and no piece."""
    pairs = np.maximum(np.asarray(lengths, np.int64) - 1, 0)
    n_pieces = -(-pairs // seq_len)
    doc = np.repeat(np.arange(len(pairs)), n_pieces)
    k = np.arange(len(doc)) - np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)  # piece index inside its doc
    start = np.asarray(starts, np.int64)[doc] + k * seq_len
    return start, np.minimum(seq_len, pairs[doc] - k * seq_len)


def first_fit(lengths: np.ndarray, capacity: int, window: int = 64) -> tuple[np.ndarray, np.ndarray, int]:
    """(row, offset) of each item placed first-fit, in order, into rows of `capacity`; returns also the row count.
    Only the `window` most recently opened rows stay open (the oldest is closed when a new one opens), so packing
    is linear in the number of items and deterministic."""
    row, off = np.empty(len(lengths), np.int64), np.empty(len(lengths), np.int64)
    free, ids, n_rows = [], [], 0
    for i, n in enumerate(np.asarray(lengths).tolist()):
        j = next((j for j, f in enumerate(free) if f >= n), -1)
        if j < 0:
            if len(free) == window:
                free.pop(0), ids.pop(0)
            free.append(capacity), ids.append(n_rows)
            n_rows, j = n_rows + 1, len(free) - 1
        row[i], off[i] = ids[j], capacity - free[j]
        free[j] -= n
        if free[j] == 0:
            free.pop(j), ids.pop(j)
    return row, off, n_rows


class SegmentSource:
    """Rows of documents packed first-fit (data.packing=segments), random access: row r → the batch contract's
    fields (see the module docstring). `tokens` may be a memmap: a row reads only its documents."""

    def __init__(self, tokens, starts: np.ndarray, lengths: np.ndarray, seq_len: int, token_bytes=None,
                 pad_id: int = 0):
        self.tokens, self.seq_len, self.token_bytes, self.pad_id = tokens, seq_len, token_bytes, pad_id
        start, pairs = pieces(starts, lengths, seq_len)
        row, off, n_rows = first_fit(pairs, seq_len)
        order = np.lexsort((off, row))  # pieces grouped by row, left to right
        self.start, self.pairs, self.off = start[order], pairs[order], off[order]
        self.row_ptr = np.searchsorted(row[order], np.arange(n_rows + 1))

    def __len__(self) -> int:
        return len(self.row_ptr) - 1

    def __getitem__(self, r):
        t = self.seq_len
        inputs, targets = np.full(t, self.pad_id, np.int32), np.full(t, self.pad_id, np.int32)
        seg, pos = np.zeros(t, np.int32), np.zeros(t, np.int32)
        for k, p in enumerate(range(self.row_ptr[r], self.row_ptr[r + 1])):
            s, n, o = int(self.start[p]), int(self.pairs[p]), int(self.off[p])
            w = np.asarray(self.tokens[s: s + n + 1], np.int32)
            inputs[o: o + n], targets[o: o + n] = w[:-1], w[1:]
            seg[o: o + n], pos[o: o + n] = k + 1, np.arange(n, dtype=np.int32)
        out = {"inputs": inputs, "targets": targets, "segment_ids": seg, "positions": pos}
        if self.token_bytes is not None:
            out["target_bytes"] = np.int32(self.token_bytes[targets[seg > 0]].sum())
        return out


class ConcatSource:
    """Windows of seq_len + 1 consecutive tokens of the documents joined with EOS (data.packing=concat): window i
    starts at token i * stride. `tokens` is the joined stream (a memmap, or a DocStream of chosen documents)."""

    def __init__(self, tokens, seq_len: int, stride: int = 1, token_bytes=None):
        self.tokens, self.seq_len, self.stride, self.token_bytes = tokens, seq_len, stride, token_bytes

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - self.seq_len - 1) // self.stride + 1)

    def __getitem__(self, i):
        s = int(i) * self.stride
        w = np.asarray(self.tokens[s: s + self.seq_len + 1], np.int32)
        out = {"inputs": w[:-1], "targets": w[1:]}
        if self.token_bytes is not None:
            out["target_bytes"] = np.int32(self.token_bytes[w[1:]].sum())
        return out


def check_rows(split: str, source, batch_size: int, key: str) -> None:
    """A split must hold at least one batch."""
    if len(source) < batch_size:
        raise DataError(f"the {split} split packs into {len(source)} rows, fewer than one batch of {key}="
                        f"{batch_size}; add documents, or lower {key} or data.seq_len")
