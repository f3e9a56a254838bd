"""The host side of numerical faults, run at log steps on every step's fetched metrics (no extra device syncs).

trainer.on_nan=stop: the first step with a NaN/Inf loss or gradient stops the run, naming the step and the last
good checkpoint (checked before any save, so no NaN state is ever checkpointed).
trainer.on_nan=skip: the jitted step already left the state unchanged on such a step (mlsys.train.step.skip_unless);
here those steps are counted, and trainer.max_nan_skips of them in a row stop the run. Every step's metrics are
fetched, so the count is exact; the stop itself lands at the log step that sees it (the state has not moved since
the streak began, so nothing is lost by waiting). The streak restarts on resume.
Loss spikes: a log step whose mean loss exceeds trainer.spike_factor x the mean of the recent log steps is reported.
"""

import math

import numpy as np

from mlsys.errors import NonFiniteError

HISTORY = 20  # log steps in the running mean that spikes are measured against


def finite(m: dict) -> bool:
    """The test the jitted step applies on the device (isfinite of loss and gradient norm)."""
    return math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])


class NumericsGuard:
    def __init__(self, on_nan: str, max_skips: int, spike_factor: float, directory: str):
        self.on_nan, self.max_skips, self.spike_factor, self.directory = on_nan, max_skips, spike_factor, directory
        self.skipped = 0  # steps skipped so far in this process's run
        self.streak = 0  # of them, in a row up to the latest step seen
        self.history: list[float] = []

    def check(self, host: list[dict], step: int, last_saved: int | None) -> list[dict]:
        """`host` holds the metrics of the steps up to `step`. Returns those of the steps that updated the state;
        raises NonFiniteError as trainer.on_nan says."""
        good = []
        for i, m in enumerate(host):
            if finite(m):
                good.append(m)
                self.streak = 0
                continue
            at = step - len(host) + i + 1
            what = "loss" if not math.isfinite(m["loss"]) else "gradient"
            saved = f"step {last_saved}" if last_saved is not None else "none"
            if self.on_nan == "stop":
                raise NonFiniteError(f"non-finite {what} at step {at}; last good checkpoint: {saved} in "
                                     f"{self.directory}. Lower optim.lr or raise optim.warmup_steps, or skip such "
                                     f"steps with trainer.on_nan=skip.")
            self.skipped += 1
            self.streak += 1
            if self.streak >= self.max_skips:
                raise NonFiniteError(f"{self.streak} steps in a row (trainer.max_nan_skips={self.max_skips}) had a "
                                     f"non-finite loss or gradient and were skipped, the last at step {at} "
                                     f"({self.skipped} skipped in all); the parameters are those of step "
                                     f"{at - self.streak}; last good checkpoint: {saved} in {self.directory}. "
                                     f"Check the data for NaN/Inf, or lower optim.lr.")
        return good

    def spike(self, loss: float) -> float | None:
        """The running mean when `loss` is a spike (which then stays out of the mean), else None."""
        if not math.isfinite(loss):
            return None
        ref = float(np.mean(self.history)) if self.history else None
        if self.spike_factor and ref is not None and loss > self.spike_factor * ref:
            return ref
        self.history = (self.history + [loss])[-HISTORY:]
        return None
