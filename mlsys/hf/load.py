"""Hugging Face weights into mlsys arrays, born sharded: each mlsys parameter is created with
jax.make_array_from_callback in its target NamedSharding, and each device's block is assembled from only the rows
of the HF tensors it covers (a scanned stack: from the per-layer tensors). Nothing whole passes through one device,
and host memory holds one block at a time beside the arrays being built."""

import jax
import numpy as np

from mlsys.errors import CheckpointError
from mlsys.hf.files import Weights
from mlsys.hf.names import IGNORED, Entry, hf_tensors, mapping, place


def _listed(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_tensors(weights: Weights, entries: list[Entry], tied: bool) -> None:
    """Every tensor the model needs is there with its shape, and nothing else is (buffers aside)."""
    want = hf_tensors(entries)
    have = {n for n in weights.tensors if not n.endswith(IGNORED)}
    if tied:
        have.discard("lm_head.weight")  # some checkpoints store the tied head too; it is the embedding
    folder = weights.folder
    missing = sorted(set(want) - have)
    if missing:
        raise CheckpointError(f"{folder}: tensor {_listed(missing)} missing from the safetensors files, though "
                              f"config.json implies it; give the checkpoint config.json belongs to (saved whole)")
    extra = sorted(have - set(want))
    if extra:
        raise CheckpointError(f"{folder}: tensor {_listed(extra)} ({weights.where(extra[0])}) is not part of the "
                              f"model config.json describes; give a checkpoint of that model only (no heads or "
                              f"adapters of other tasks)")
    wrong = [f"{n} is {list(weights.shape(n))} in {weights.where(n)}, config.json implies {list(s)}"
             for n, s in want.items() if weights.shape(n) != tuple(s)]
    if wrong:
        raise CheckpointError(f"{folder}: tensor {_listed(wrong, 2)}; give the checkpoint config.json belongs to")


class HFSource:
    """A Hugging Face folder's weights, checked against the mlsys decoder config `model_cfg` (vocab: the real
    vocabulary), ready to be placed: `array(path, sharding, dtype)` builds one mlsys parameter."""

    def __init__(self, folder: str, model_cfg, vocab: int):
        self.entries = {e.path: e for e in mapping(model_cfg, vocab)}
        self.weights = Weights(folder)
        if model_cfg.name == "gpt" and not any(n.startswith("transformer.") for n in self.weights.tensors):
            # GPT-2 as OpenAI's original checkpoints name it ("h.0.attn.c_attn.weight", no "transformer.")
            self.weights.tensors = {f"transformer.{n}" if n != "lm_head.weight" else n: v
                                    for n, v in self.weights.tensors.items()}
        check_tensors(self.weights, list(self.entries.values()), model_cfg.tie_embeddings)

    def array(self, path: tuple, sharding, dtype) -> jax.Array:
        entry = self.entries[path]
        dtype = np.dtype(dtype)
        return jax.make_array_from_callback(entry.shape, sharding,
                                            lambda index: place(entry, index, self.weights.read, dtype))

    def close(self) -> None:
        self.weights.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
