"""Pruning masks: a pruned model carries, beside each prunable kernel, a `kernel_mask` (a `PruneMask` variable:
not an nnx.Param, so never trained) and multiplies the kernel by it in every call. The gradient of a masked weight
is therefore exactly zero, and with the optimizer state starting afresh (trainer.init_from) neither Adam(W) nor
SGD moves it: pruned weights stay exactly zero through fine-tuning, resume and export (`unmask` folds the mask in
and gives back the plain layers).

Prunable kernels: those of every nnx.Linear and nnx.Conv except a module's `head` (the classifier: pruning its
output channels would remove classes). `magnitude` zeroes the smallest |w| of each kernel; `structured` zeroes
whole output channels, those with the smallest L2 norm.
"""

from dataclasses import dataclass

import os
import zlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlsys.errors import ConfigError

METHODS = ("magnitude", "structured")
KEEP = ("head",)  # attribute names never pruned


@dataclass
class PruneConfig:
    sparsity: float = 0.0  # fraction of each prunable kernel that is zero; 0 = not pruned (no masks)
    method: str = "magnitude"  # one of METHODS


class PruneMask(nnx.Variable):
    """1 where a kernel's weight is kept, 0 where it was pruned."""


def _masked_call(layer, plain_call, x):
    # The layer's own call, on kernel x mask: the same code path as the plain layer (and its gradient w.r.t. a
    # pruned weight is exactly zero). The kernel's value is put back afterwards.
    kernel = layer.kernel.get_value()
    layer.kernel.set_value(kernel * layer.kernel_mask.get_value().astype(kernel.dtype))
    try:
        return plain_call(layer, x)
    finally:
        layer.kernel.set_value(kernel)


class MaskedLinear(nnx.Linear):
    def __call__(self, x):
        return _masked_call(self, nnx.Linear.__call__, x)


class MaskedConv(nnx.Conv):
    def __call__(self, x):
        return _masked_call(self, nnx.Conv.__call__, x)


MASKED = {nnx.Linear: MaskedLinear, nnx.Conv: MaskedConv}


def prunable(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    """(dotted path, layer) of every prunable layer (plain or already masked)."""
    out = []
    for path, parent in nnx.iter_graph(model):
        if not isinstance(parent, nnx.Module):
            continue
        for name, value in list(vars(parent).items()):
            kind = type(value)
            if name not in KEEP and (kind in MASKED or kind in MASKED.values()):
                out.append((".".join(map(str, (*path, name))), value))
    return out


def add_masks(model: nnx.Module) -> nnx.Module:
    """Every prunable layer becomes its masked twin with an all-ones mask (the pruned values come from a
    checkpoint: experiments.prune writes them, trainer.init_from loads them)."""
    layers = prunable(model)
    if not layers:
        raise ConfigError(f"prune: {type(model).__name__} has no prunable kernels (nnx.Linear / nnx.Conv layers "
                          f"other than the output head); pruning needs a model built from them")
    for _, layer in layers:
        if type(layer) in MASKED:
            kernel = layer.kernel
            layer.kernel_mask = PruneMask(jnp.ones(kernel.shape, jnp.bool_), **kernel.get_metadata())
            object.__setattr__(layer, "__class__", MASKED[type(layer)])
    return model


def unmask(model: nnx.Module) -> nnx.Module:
    """The plain model: each mask folded into its kernel (kernel x mask), the masks and masked classes gone."""
    plain = {v: k for k, v in MASKED.items()}
    for _, layer in prunable(model):
        if type(layer) in plain:
            layer.kernel.set_value(layer.kernel.get_value() * layer.kernel_mask.get_value().astype(layer.kernel.dtype))
            del layer.kernel_mask
            object.__setattr__(layer, "__class__", plain[type(layer)])
    return model


def compute_mask(kernel: np.ndarray, sparsity: float, method: str) -> np.ndarray:
    """A boolean keep-mask with floor(sparsity x n) zeros: n weights (magnitude) or n output channels (the
    kernel's last axis; structured). Ties are broken by position, so the count is exact."""
    if method == "magnitude":
        flat = np.abs(kernel.astype(np.float32)).ravel()
        cut = int(np.floor(sparsity * flat.size))
        keep = np.ones(flat.size, bool)
        keep[np.argsort(flat, kind="stable")[:cut]] = False
        return keep.reshape(kernel.shape)
    norms = np.sqrt((kernel.astype(np.float32) ** 2).reshape(-1, kernel.shape[-1]).sum(0))
    cut = int(np.floor(sparsity * norms.size))
    keep = np.ones(norms.size, bool)
    keep[np.argsort(norms, kind="stable")[:cut]] = False
    return np.broadcast_to(keep, kernel.shape).copy()


def check(cfg: PruneConfig, key: str = "prune") -> None:
    if not (0 <= cfg.sparsity < 1):
        raise ConfigError(f"{key}.sparsity={cfg.sparsity!r}: must be in [0, 1), e.g. sparsity=0.5 (half the weights "
                          f"of each prunable kernel set to zero)")
    if cfg.method not in METHODS:
        raise ConfigError(f"{key}.method={cfg.method!r}: must be one of {list(METHODS)}")


def pruning_report(model: nnx.Module, folder: str) -> dict:
    """The zero fraction of the (unmasked) model's prunable kernels, and each weight file of an export folder's
    size, raw and zlib-compressed (what the zeros save on disk or on the wire)."""
    kernels = [np.asarray(layer.kernel.get_value()) for _, layer in prunable(model)]
    files = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith((".onnx", ".safetensors")):
            raw = open(os.path.join(folder, name), "rb").read()
            files[name] = {"bytes": len(raw), "compressed_bytes": len(zlib.compress(raw, 6))}
    return {"zero_fraction": float(sum((k == 0).sum() for k in kernels) / max(1, sum(k.size for k in kernels))),
            "files": files}
