"""Data: sources (digits, text, synthetic, a user's arrays, image folders, Hugging Face datasets
from disk) and the grain pipeline."""

from mlsys.data.pipeline import eval_batches, train_iterator
from mlsys.data.sources import CONFIGS, Dataset, load, save_meta
from mlsys.data import hf, images  # noqa: F401  (register data=hf, data=images)

__all__ = ["CONFIGS", "Dataset", "load", "save_meta", "train_iterator", "eval_batches"]
