"""Image statistics travel inside the exported model: a run trained on normalised images (data=images, data=hf
with an image column) exports as `model((x - mean) / std)`, so that ONNX Runtime, the server and any client feed
plain [0, 1] pixels and never need the training split's statistics."""

import jax.numpy as jnp
import numpy as np
from flax import nnx


class Normalized(nnx.Module):
    """`model` with per-channel normalisation in front (mean and std are constants of the graph)."""

    def __init__(self, model: nnx.Module, mean, std):
        self.model = model
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)  # static, hashable

    def __call__(self, x):
        return self.model((x - jnp.asarray(self.mean, x.dtype)) / jnp.asarray(self.std, x.dtype))


def with_normalization(model: nnx.Module, meta: dict):
    """(the model to export, a function from the dataset's normalised inputs to the raw pixels it takes)."""
    norm = meta.get("normalization")
    if not isinstance(norm, dict):
        return model, lambda x: x
    mean, std = np.asarray(norm["mean"], np.float32), np.asarray(norm["std"], np.float32)
    return Normalized(model, mean, std), lambda x: (np.asarray(x, np.float32) * std + mean).astype(np.float32)
