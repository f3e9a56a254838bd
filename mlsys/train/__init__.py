"""Training: the state, the pure step functions, and the loop."""

from mlsys.train.loop import train

__all__ = ["train"]
