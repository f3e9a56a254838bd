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

from mlsys.serve.decoder import Decoder


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
        mask, ids = Decoder.left_pad(prompts)
        positions = Decoder.positions(mask, mask.shape[1])
        logits, present = self.decoder.step(ids, mask, positions, self.decoder.empty_past(len(prompts)))
        return logits[:, -1], present, mask

    def join(self, rows: list, past: list, mask: np.ndarray, first: np.ndarray) -> None:
        """Add prefilled rows; `first` is each one's first sampled token (its next input)."""
        self.past, self.mask = Decoder.concat_rows([(self.past, self.mask), (past, mask)])
        self.next_ids = np.concatenate([self.next_ids, np.asarray(first, np.int32)])
        self.next_pos = np.concatenate([self.next_pos, mask.sum(1).astype(np.int32)])
        self.rows += rows

    def leave(self, keep: list[bool]) -> None:
        """Keep only the rows marked True, then cut the slots no remaining row uses."""
        if all(keep):
            return
        idx = np.flatnonzero(keep)
        self.rows = [self.rows[i] for i in idx]
        self.next_ids, self.next_pos = self.next_ids[idx], self.next_pos[idx]
        self.past, self.mask = Decoder.take_rows(self.past, self.mask, idx)

    def step(self) -> np.ndarray:
        """One decode step for every row: feeds each row's next token; returns logits [B, V]."""
        b = len(self.rows)
        mask = np.concatenate([self.mask, np.ones((b, 1), np.int32)], 1)
        logits, self.past = self.decoder.step(self.next_ids[:, None], mask, self.next_pos[:, None], self.past)
        self.mask = mask
        self.next_pos = self.next_pos + 1
        return logits[:, -1]
