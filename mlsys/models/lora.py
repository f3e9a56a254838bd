"""LoRA: low-rank adapters on a model's nnx.Linear layers, for fine-tuning a trained run cheaply.

`add_lora` swaps each targeted nnx.Linear for a LoRALinear that keeps the layer's own kernel and bias (same
attribute names, so a pretrained checkpoint's paths still match) and adds y += (alpha/r)·x·A·B, with B = 0 at the
start so that fine-tuning begins exactly at the pretrained function. Every other weight becomes `Frozen`, which
is not an nnx.Param: the train step, which differentiates and updates nnx.Param only, leaves it alone without a
line of its own changing, and the optimizer keeps no state for it. `merge_lora` folds the adapters back into
plain nnx.Linear kernels for export. With `quantize_base` (QLoRA) the frozen kernel of each adapted layer is kept
only quantized (`kernel_codes`, `kernel_scale`; trainer.init_from quantizes the pretrained kernel) and dequantized
inside the matmul; the adapters train in the compute dtype.
"""

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from mlsys.errors import ConfigError
from mlsys.models import quant


@dataclass
class LoRAConfig:
    rank: int = 0  # 0 = no adapters (plain training)
    alpha: float = 16.0  # the update is scaled by alpha / rank
    # fnmatch patterns over the dotted path of each nnx.Linear (e.g. "blocks.0.attn.qkv", or "blocks.attn.qkv" for
    # every layer of a scanned stack); "*" = all of them
    targets: list[str] = field(default_factory=lambda: ["*"])
    # QLoRA: the adapted (frozen) kernels stored as "int8" (per output channel) or "nf4" (4-bit NormalFloat,
    # block-wise scales), dequantized inside the matmul; None = as trained (mlsys/models/quant.py)
    quantize_base: Optional[str] = None


class Frozen(nnx.Variable):
    """A pretrained weight that LoRA fine-tuning keeps fixed."""


def _names(var) -> tuple:
    meta = var.get_metadata()
    return tuple(meta.get("out_sharding") or meta.get("sharding_names") or (None, None))


def _meta(var, names: tuple) -> dict:
    """`var`'s metadata with other logical axis names (the quantized arrays shard like the kernel)."""
    meta = dict(var.get_metadata())
    key = "out_sharding" if "out_sharding" in meta else "sharding_names"
    meta[key] = names
    return meta


class LoRALinear(nnx.Linear):
    def __init__(self, base: nnx.Linear, rank: int, alpha: float, *, rngs: nnx.Rngs, quantize: str | None = None):
        super().__init__(base.in_features, base.out_features, use_bias=base.use_bias, dtype=base.dtype,
                         param_dtype=base.param_dtype, precision=base.precision, dot_general=base.dot_general,
                         promote_dtype=base.promote_dtype, preferred_element_type=base.preferred_element_type,
                         rngs=rngs)
        self.kernel, self.bias = base.kernel, base.bias  # the pretrained weights, under their old names
        self.scale = alpha / rank
        self.quantize = quantize
        names = _names(base.kernel)
        if quantize:  # QLoRA: the frozen kernel only as codes and scales (trainer.init_from fills them)
            codes, scales = quant.quantize(base.kernel.get_value(), quantize)
            self.kernel_codes = Frozen(codes, **_meta(base.kernel, names))
            lead_names = names[:-2]  # a scanned stack's layer axis
            self.kernel_scale = Frozen(scales, **_meta(base.kernel, (*lead_names, names[-1]) if quantize == "int8"
                                                       else (*lead_names, None, names[-1])))
            del self.kernel
        # The adapters shard like the kernel they adapt: A along its input axis, B along its output axis. A kernel
        # of a scanned layer stack has a leading layer axis: its adapters get one too (one pair per layer).
        lead = tuple(base.kernel.shape[:-2])
        if len(names) < len(lead) + 2:
            names = (None,) * (len(lead) + 2)
        batch = tuple(range(len(lead)))
        a_init = nnx.with_partitioning(nnx.initializers.lecun_normal(batch_axis=batch), (*names[:-1], None))
        b_init = nnx.with_partitioning(nnx.initializers.zeros_init(), (*names[:-2], None, names[-1]))
        self.lora_a = nnx.LoRAParam(a_init(rngs.params(), (*lead, base.in_features, rank), base.param_dtype))
        self.lora_b = nnx.LoRAParam(b_init(rngs.params(), (*lead, rank, base.out_features), base.param_dtype))

    def base_kernel(self, dtype=None):
        """The frozen kernel, dequantized (in `dtype`) when stored quantized."""
        if self.quantize:
            return quant.dequantize(self.kernel_codes[...], self.kernel_scale[...], self.quantize,
                                    dtype or self.param_dtype)
        return self.kernel[...] if dtype is None else self.kernel[...].astype(dtype)

    def __call__(self, x: Float[Array, "*B I"]) -> Float[Array, "*B O"]:
        dtype = self.dtype or x.dtype
        if self.quantize:  # dequantized inside the jitted matmul (fused by XLA; no float kernel is kept)
            y = jax.lax.dot_general(x.astype(dtype), self.base_kernel(dtype), (((x.ndim - 1,), (0,)), ((), ())),
                                    precision=self.precision)
            if self.bias is not None:
                y = y + self.bias[...].astype(dtype)
        else:
            y = super().__call__(x)
        a, b = self.lora_a[...].astype(dtype), self.lora_b[...].astype(dtype)
        return y + ((x.astype(dtype) @ a) @ b * self.scale).astype(y.dtype)

    def merged_kernel(self):
        kernel = self.base_kernel()
        return kernel + (self.lora_a[...] @ self.lora_b[...] * self.scale).astype(kernel.dtype)


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _modules(model: nnx.Module):
    """(dotted path, module) of every module in the graph, the model included."""
    return [(_dotted(p), m) for p, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)]


def _linears(model: nnx.Module, targets: list[str]):
    """(parent, attribute, dotted path) of every targeted nnx.Linear that is a module's attribute."""
    out = []
    for path, parent in _modules(model):
        for name, value in list(vars(parent).items()):
            full = f"{path}.{name}" if path else name
            if type(value) is nnx.Linear and any(fnmatch.fnmatchcase(full, t) for t in targets):
                out.append((parent, name, full))
    return out


def add_lora(model: nnx.Module, cfg: LoRAConfig, rngs: nnx.Rngs) -> nnx.Module:
    """Adapters on the targeted layers, everything else frozen."""
    found = _linears(model, cfg.targets)
    if not found:
        every = [p for _, _, p in _linears(model, ["*"])]
        raise ConfigError(f"lora.targets={cfg.targets} matches no nnx.Linear of {type(model).__name__}; its linear "
                         f"layers are {every}")
    for parent, name, _ in found:
        setattr(parent, name, LoRALinear(getattr(parent, name), cfg.rank, cfg.alpha, rngs=rngs,
                                         quantize=cfg.quantize_base))
    _retype(model, nnx.Param, Frozen)
    return model


def merge_lora(model: nnx.Module) -> nnx.Module:
    """The same model with every LoRALinear folded into a plain nnx.Linear and every weight an nnx.Param again:
    structurally the model without adapters (the export path sees an ordinary model)."""
    for path, parent in _modules(model):
        for name, value in list(vars(parent).items()):
            if isinstance(value, LoRALinear):
                plain = nnx.eval_shape(lambda v=value: nnx.Linear(
                    v.in_features, v.out_features, use_bias=v.use_bias, dtype=v.dtype, param_dtype=v.param_dtype,
                    precision=v.precision, dot_general=v.dot_general, promote_dtype=v.promote_dtype,
                    preferred_element_type=v.preferred_element_type, rngs=nnx.Rngs(0)))
                names = (_names(value.lora_a)[0], _names(value.lora_b)[1])
                plain.kernel = nnx.Param(value.merged_kernel(), **_meta(value.lora_a, names))
                plain.bias = value.bias
                setattr(parent, name, plain)
    _retype(model, Frozen, nnx.Param)
    return model


def _retype(model: nnx.Module, old: type, new: type) -> None:
    for _, parent in _modules(model):
        for name, value in list(vars(parent).items()):
            if type(value) is old:
                setattr(parent, name, new(value.get_value(), **value.get_metadata()))


def count(*parts) -> tuple[int, int]:
    """(trainable, total) parameter counts of a model, or of the states it was split into (params, rest): the
    nnx.Param entries are trained, the Frozen ones count towards the total."""
    states = [nnx.state(p) if isinstance(p, nnx.Module) else p for p in parts]
    sizes = {nnx.Param: 0, Frozen: 0}
    for state in states:
        for path, v in nnx.to_flat_state(state):
            if path[-1] == "kernel_scale":  # QLoRA's scales are not weights of the model
                continue
            n = v.get_value().size * (2 if path[-1] == "kernel_codes" and v.get_value().dtype == "uint8" else 1)
            for kind in sizes:
                if isinstance(v, kind):
                    sizes[kind] += n  # a packed NF4 byte holds two weights
    return sizes[nnx.Param], sizes[nnx.Param] + sizes[Frozen]


def base_bytes_per_device(params, rest) -> int:
    """Bytes on one device of the frozen kernels that LoRA adapts (float, or QLoRA's codes and scales)."""
    adapted = {path[:-1] for path, _ in nnx.to_flat_state(params) if path[-1] == "lora_a"}
    total = 0
    for path, v in nnx.to_flat_state(rest):
        if path[:-1] in adapted and path[-1] in ("kernel", "kernel_codes", "kernel_scale"):
            x = v.get_value()
            # a placed array: its first shard; an abstract one (eval_shape): the whole array
            total += x.addressable_shards[0].data.nbytes if hasattr(x, "addressable_shards") else \
                math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
    return total
