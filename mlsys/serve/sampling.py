"""Picking the next token of every row of a decode batch from its logits, in numpy: temperature (0 = greedy),
top-k, top-p, each row with its own settings and its own random generator (seeded from its request's `seed`).

Every operation works along a row only (sorts, sums and cumulative sums per row; one uniform draw per row from the
row's own generator), so a row's token does not depend on which other rows share the batch: a completion is
reproducible given its seed and the same batch companions (which only change its logits through the rounding of
a differently padded batch). Vectorised over the batch, float32, one sort per row only where top-k/top-p need it."""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # the smallest set of tokens whose probabilities add up to top_p (1 = all)
    top_k: int = 0  # the k most likely tokens (0 = all)


def pick(logits: np.ndarray, settings: list[Sampling], rngs: list[np.random.Generator]) -> np.ndarray:
    """One token id per row of float logits [B, V]."""
    b, v = logits.shape
    out = np.zeros(b, np.int64)
    temperature = np.array([s.temperature for s in settings], np.float32)
    greedy = temperature == 0
    if greedy.any():
        out[greedy] = logits[greedy].argmax(1)
    plain = np.array([not (0 < s.top_k < v or s.top_p < 1) for s in settings]) & ~greedy
    if plain.any():  # all tokens: no sort needed
        rows = np.flatnonzero(plain)
        out[rows] = _draw(_weights(logits[rows], temperature[rows]), rngs, rows)
    rows = np.flatnonzero(~plain & ~greedy)
    if len(rows):  # top-k and/or top-p: work on each row's tokens sorted by logit, most likely first
        k = np.array([settings[i].top_k or v for i in rows])
        neg = -logits[rows]
        if k.max() < v:  # every row has a top-k: only the largest max(k) need sorting (a partition finds them)
            part = np.argpartition(neg, k.max() - 1, axis=1)[:, :k.max()]
            order = np.take_along_axis(part, np.argsort(np.take_along_axis(neg, part, 1), axis=1, kind="stable"), 1)
        else:
            order = np.argsort(neg, axis=1, kind="stable")
        p = _weights(np.take_along_axis(logits[rows], order, 1), temperature[rows])
        p[np.arange(order.shape[1])[None, :] >= k[:, None]] = 0.0  # the k-th's ties fall out, unlike generate's
        top_p = np.array([settings[i].top_p for i in rows], np.float32)
        mass = np.cumsum(p, axis=1)
        before = (mass - p) / mass[:, -1:]  # normalised mass strictly above each token: the first always stays
        p[before >= top_p[:, None]] = 0.0
        out[rows] = order[np.arange(len(rows)), _draw(p, rngs, rows)]
    return out


def _weights(logits: np.ndarray, temperature: np.ndarray) -> np.ndarray:
    """Unnormalised probabilities exp((logit - max) / temperature), float32, per row."""
    z = logits.astype(np.float32, copy=True)
    z -= z.max(1, keepdims=True)
    z *= (1.0 / temperature)[:, None]
    return np.exp(z, out=z)


def _draw(weights: np.ndarray, rngs: list, rows: np.ndarray) -> np.ndarray:
    """Inverse CDF, one uniform draw per row from that row's own generator: the first index whose cumulative
    weight exceeds the draw (it always has a non-zero weight; the draw is below the total, so one always exists)."""
    cdf = np.cumsum(weights, axis=1)
    u = np.array([rngs[i].random() for i in rows], np.float32) * cdf[:, -1]
    return np.minimum((cdf <= u[:, None]).sum(1), weights.shape[1] - 1)
