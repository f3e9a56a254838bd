"""The running decode batch: its rows and their one shared KV cache, which rows join and leave between tokens.

Layout (mlsys/serve/decoder.py's graph): every layer's past is [B, n_kv_head, P, head_dim], and an attention mask
[B, P] says which slots hold a real token. Rows are LEFT-padded: each row's tokens are the rightmost slots, so one
decode step appends one slot to every row at the same place, and the last column of a prefill is every row's last
prompt token. Positions count a row's real tokens only (mask cumsum), so padding never shifts them.

- join: newly prefilled rows (their own [n, K, L, Dh] cache) are concatenated on the batch axis after padding
  the shorter of the two pasts on the left.
- leave: the rows that stay are taken; then the leading columns that no row uses any more are cut off. Because
  tokens sit at the right, the past is then exactly as long as the longest row — never past the context, since a
  request's prompt plus max_tokens fit in it (checked on arrival).

All of it runs in the scheduler's worker thread (numpy and ONNX Runtime), never on the event loop."""

import numpy as np


def pad_left(past: list, mask: np.ndarray, length: int) -> tuple[list, np.ndarray]:
    """Past and mask widened to `length` slots with empty (masked) slots on the left."""
    extra = length - mask.shape[1]
    if extra <= 0:
        return past, mask
    widths = ((0, 0), (0, 0), (extra, 0), (0, 0))
    return ([(np.pad(k, widths), np.pad(v, widths)) for k, v in past],
            np.pad(mask, ((0, 0), (extra, 0))))


def left_padded(prompts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) [n, L]: the prompts right-aligned, zeros (masked) before the shorter ones."""
    length = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), length), np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = p
        mask[i, length - len(p):] = 1
    return ids, mask


class RunningBatch:
    """Rows (any objects: the scheduler's sequences) in cache order, with the cache, mask, next input token and
    next position of each."""

    def __init__(self, decoder):
        self.decoder = decoder
        self.rows: list = []
        self.past: list = decoder.empty_past(0)
        self.mask = np.zeros((0, 0), np.int32)
        self.next_ids = np.zeros(0, np.int32)  # each row's last sampled token: its next input
        self.next_pos = np.zeros(0, np.int32)  # that token's position = real tokens before it

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def slots(self) -> int:
        return self.mask.shape[1]

    def prefill(self, prompts: list[np.ndarray]) -> tuple[np.ndarray, list, np.ndarray]:
        """Run the prompts (left-padded together, empty past); returns (last logits [n, V], cache, mask)."""
        ids, mask = left_padded(prompts)
        positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
        logits, present = self.decoder.step(ids, mask, positions, self.decoder.empty_past(len(prompts)))
        return logits[:, -1], present, mask

    def join(self, rows: list, past: list, mask: np.ndarray, first: np.ndarray) -> None:
        """Add prefilled rows; `first` is each one's first sampled token (its next input)."""
        length = max(self.slots, mask.shape[1])
        old_past, old_mask = pad_left(self.past, self.mask, length)
        new_past, new_mask = pad_left(past, mask, length)
        self.past = [(np.concatenate([k0, k1]), np.concatenate([v0, v1]))
                     for (k0, v0), (k1, v1) in zip(old_past, new_past)]
        self.mask = np.concatenate([old_mask, new_mask])
        self.next_ids = np.concatenate([self.next_ids, np.asarray(first, np.int32)])
        self.next_pos = np.concatenate([self.next_pos, mask.sum(1).astype(np.int32)])
        self.rows += rows

    def leave(self, keep: list[bool]) -> None:
        """Keep only the rows marked True, then cut the slots no remaining row uses."""
        if all(keep):
            return
        idx = np.flatnonzero(keep)
        self.rows = [self.rows[i] for i in idx]
        self.mask, self.next_ids, self.next_pos = self.mask[idx], self.next_ids[idx], self.next_pos[idx]
        used = np.flatnonzero(self.mask.any(0))
        start = int(used[0]) if len(used) else self.slots
        # copies, not views: a view would keep the whole old cache alive
        self.past = [(np.ascontiguousarray(k[idx, :, start:]), np.ascontiguousarray(v[idx, :, start:]))
                     for k, v in self.past]
        self.mask = self.mask[:, start:]

    def step(self) -> np.ndarray:
        """One decode step for every row: feeds each row's next token; returns logits [B, V]."""
        b = len(self.rows)
        mask = np.concatenate([self.mask, np.ones((b, 1), np.int32)], 1)
        logits, self.past = self.decoder.step(self.next_ids[:, None], mask, self.next_pos[:, None], self.past)
        self.mask = mask
        self.next_pos = self.next_pos + 1
        return logits[:, -1]
