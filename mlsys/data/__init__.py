"""Data: sources (digits, text, synthetic, a user's arrays) and the grain pipeline."""

from mlsys.data.pipeline import eval_batches, train_iterator
from mlsys.data.sources import CONFIGS, Dataset, load, save_meta

__all__ = ["CONFIGS", "Dataset", "load", "save_meta", "train_iterator", "eval_batches"]
