"""Data: sources (digits, text, synthetic, a user's arrays, image folders, Hugging Face datasets
from disk) and the grain pipeline."""

from mlsys.data.sources import CONFIGS, Dataset, load, save_meta
from mlsys.data import hf, images  # noqa: F401  (register data=hf, data=images)

__all__ = ["CONFIGS", "Dataset", "load", "save_meta", "train_iterator", "eval_batches"]


def __getattr__(name: str):
    # The pipeline (grain, and jax under it) loads on first use: a process that only reads or tokenizes data (the
    # corpus cache's spawned workers, `python -m mlsys.data.cache`-style tools) then starts in ~0.4 CPU-s, not ~2.
    if name in ("train_iterator", "eval_batches"):
        from mlsys.data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'mlsys.data' has no attribute {name!r}")
