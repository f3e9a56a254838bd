"""Input drift: the population stability index (PSI) of a sliding window of recent inputs against the training
inputs' reference statistics saved at export (per-feature histograms for arrays, token frequencies for text).

Counts are updated incrementally (add the new rows' bins, subtract the ones leaving the window), so observing a
batch costs O(batch × features) and the PSI itself O(features × bins), whatever the window size."""

import collections
import logging
import threading

import numpy as np

from mlsys.export.reference import bin_index, psi

log = logging.getLogger("mlsys.serve")


class DriftMonitor:
    def __init__(self, reference: dict, window: int, min_rows: int, threshold: float):
        self.kind, self.window, self.min_rows, self.threshold = reference["kind"], window, min_rows, threshold
        self._lock = threading.Lock()
        self._recent = collections.deque()  # tokens: the token ids of each recent example
        if self.kind == "tokens":
            self._expected = np.asarray(reference["freq"], np.float64)
            self._counts = np.zeros(len(self._expected), np.int64)
        else:
            self._lo, self._hi, self._bins = reference["lo"], reference["hi"], reference["bins"]
            self._expected = np.asarray(reference["hist"], np.float64)  # F, bins
            self._counts = np.zeros(self._expected.shape, np.int64)
            self._cols = np.arange(self._expected.shape[0])
            # a ring of the last `window` rows' bins, overwritten in place
            self._ring = np.zeros((window, len(self._cols)), np.int64)
            self._filled = np.zeros(window, bool)
            self._pos = 0
        self.score = 0.0
        self.alerting = False

    @property
    def rows(self) -> int:
        return len(self._recent) if self.kind == "tokens" else int(self._filled.sum())

    def observe(self, inputs) -> None:
        """Add a batch: an (N, ...) float array, or a list of token-id arrays. Thread-safe."""
        with self._lock:
            if self.kind == "tokens":
                for t in inputs:
                    self._recent.append(t)
                    np.add.at(self._counts, t, 1)
                while len(self._recent) > self.window:
                    np.subtract.at(self._counts, self._recent.popleft(), 1)
            else:
                self._observe_rows(np.asarray(inputs, np.float64).reshape(len(inputs), -1)[-self.window:])
            self._update()

    def _observe_rows(self, x: np.ndarray) -> None:
        idx = bin_index(x, self._lo, self._hi, self._bins)  # N, F
        slots = (self._pos + np.arange(len(idx))) % self.window
        cols = np.broadcast_to(self._cols, idx.shape)
        leaving = self._filled[slots]
        np.subtract.at(self._counts, (cols[leaving], self._ring[slots[leaving]]), 1)
        self._ring[slots], self._filled[slots] = idx, True
        np.add.at(self._counts, (cols, idx), 1)
        self._pos = int((self._pos + len(idx)) % self.window)

    def _update(self) -> None:
        if self.rows < self.min_rows:
            self.score = 0.0
            return
        self.score = psi(self._expected, self._counts)
        above = self.score > self.threshold
        if above and not self.alerting:  # log on crossing, not on every batch
            log.warning("input drift: PSI %.3f over the last %d examples is above serve.drift_threshold=%g; "
                        "the inputs no longer look like the training data", self.score, self.rows,
                        self.threshold)
        elif self.alerting and not above:
            log.info("input drift back below threshold: PSI %.3f", self.score)
        self.alerting = above
