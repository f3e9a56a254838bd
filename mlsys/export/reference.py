"""Reference statistics of the training inputs, saved with an export (reference_stats.json) so that a server can
tell when the inputs it sees drift away from what the model was trained on, and can reject values far outside the
training range. numpy only: the server shares `bin_index` and `psi` with export, so both bin values identically.

- array inputs: per-feature histograms over one shared range [lo, hi] (the training min and max), plus the
  per-feature and overall min/max;
- token inputs: the frequency of every token id.
"""

import numpy as np

BINS = 10
EPS = 1e-4  # floor for an empty bin's share: PSI has ln(p/q), undefined at 0


def bin_index(x: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    """Bin of every value over `bins` equal bins of [lo, hi]; values outside land in the first or last bin."""
    scale = bins / (hi - lo) if hi > lo else 0.0
    return np.clip(((x - lo) * scale).astype(np.int64), 0, bins - 1)


def shares(counts: np.ndarray) -> np.ndarray:
    """Counts (..., bins) to smoothed proportions along the last axis."""
    counts = np.asarray(counts, np.float64)
    p = counts / np.maximum(counts.sum(-1, keepdims=True), 1)
    p = np.maximum(p, EPS)
    return p / p.sum(-1, keepdims=True)


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index of `actual` against `expected` (both proportions over the same bins, last
    axis); several rows (features) are averaged. Rule of thumb: < 0.1 stable, 0.1-0.25 moderate, > 0.25 shifted."""
    e, a = shares(expected), shares(actual)
    return float(np.mean(np.sum((a - e) * np.log(a / e), axis=-1)))


def reference_stats(inputs: np.ndarray, kind: str, vocab_size: int | None = None) -> dict:
    """Statistics of training inputs: (N, *shape) floats for kind="array", (N, T) token ids for kind="tokens"."""
    if kind == "tokens":
        counts = np.bincount(inputs.reshape(-1).astype(np.int64), minlength=vocab_size)
        return {"kind": "tokens", "vocab_size": int(vocab_size), "examples": int(len(inputs)),
                "tokens": int(inputs.size), "freq": (counts / counts.sum()).round(8).tolist()}
    x = inputs.reshape(len(inputs), -1).astype(np.float64)
    lo, hi = float(x.min()), float(x.max())
    idx = bin_index(x, lo, hi, BINS)  # N, F
    counts = np.stack([np.bincount(idx[:, f], minlength=BINS) for f in range(x.shape[1])])
    return {"kind": "array", "examples": int(len(x)), "features": int(x.shape[1]), "bins": BINS, "lo": lo, "hi": hi,
            "min": x.min(0).tolist(), "max": x.max(0).tolist(),
            "hist": (counts / len(x)).round(8).tolist()}


def spread_inputs(split, max_examples: int = 5000) -> np.ndarray:
    """Up to `max_examples` inputs of a split, spread evenly over it."""
    idx = np.linspace(0, len(split) - 1, min(max_examples, len(split))).astype(int)  # distinct: spacing >= 1
    return np.stack([split[int(i)]["inputs"] for i in idx])
