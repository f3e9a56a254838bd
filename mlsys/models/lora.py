"""LoRA: low-rank adapters on a model's nnx.Linear layers, for fine-tuning a trained run cheaply.

`add_lora` swaps each targeted nnx.Linear for a LoRALinear that keeps the layer's own kernel and bias (same
attribute names, so a pretrained checkpoint's paths still match) and adds y += (alpha/r)·x·A·B, with B = 0 at the
start so that fine-tuning begins exactly at the pretrained function. Every other weight becomes `Frozen`, which
is not an nnx.Param: the train step, which differentiates and updates nnx.Param only, leaves it alone without a
line of its own changing, and the optimizer keeps no state for it. `merge_lora` folds the adapters back into
plain nnx.Linear kernels for export.
"""

import fnmatch
from dataclasses import dataclass, field

from flax import nnx
from jaxtyping import Array, Float

from mlsys.errors import ConfigError


@dataclass
class LoRAConfig:
    rank: int = 0  # 0 = no adapters (plain training)
    alpha: float = 16.0  # the update is scaled by alpha / rank
    # fnmatch patterns over the dotted path of each nnx.Linear (e.g. "blocks.0.attn.qkv"); "*" = all of them
    targets: list[str] = field(default_factory=lambda: ["*"])


class Frozen(nnx.Variable):
    """A pretrained weight that LoRA fine-tuning keeps fixed."""


class LoRALinear(nnx.Linear):
    def __init__(self, base: nnx.Linear, rank: int, alpha: float, *, rngs: nnx.Rngs):
        super().__init__(base.in_features, base.out_features, use_bias=base.use_bias, dtype=base.dtype,
                         param_dtype=base.param_dtype, precision=base.precision, dot_general=base.dot_general,
                         promote_dtype=base.promote_dtype, preferred_element_type=base.preferred_element_type,
                         rngs=rngs)
        self.kernel, self.bias = base.kernel, base.bias  # the pretrained weights, under their old names
        self.scale = alpha / rank
        # The adapters shard like the kernel they adapt: A along its input axis, B along its output axis.
        meta = base.kernel.get_metadata()
        names = meta.get("out_sharding") or meta.get("sharding_names") or (None, None)
        a_init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (names[0], None))
        b_init = nnx.with_partitioning(nnx.initializers.zeros_init(), (None, names[1]))
        self.lora_a = nnx.LoRAParam(a_init(rngs.params(), (base.in_features, rank), base.param_dtype))
        self.lora_b = nnx.LoRAParam(b_init(rngs.params(), (rank, base.out_features), base.param_dtype))

    def __call__(self, x: Float[Array, "*B I"]) -> Float[Array, "*B O"]:
        y = super().__call__(x)
        dtype = self.dtype or x.dtype
        a, b = self.lora_a[...].astype(dtype), self.lora_b[...].astype(dtype)
        return y + ((x.astype(dtype) @ a) @ b * self.scale).astype(y.dtype)

    def merged_kernel(self):
        return self.kernel[...] + (self.lora_a[...] @ self.lora_b[...] * self.scale).astype(self.kernel.dtype)


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
        setattr(parent, name, LoRALinear(getattr(parent, name), cfg.rank, cfg.alpha, rngs=rngs))
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
                plain.kernel = nnx.Param(value.merged_kernel(), **value.kernel.get_metadata())
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
        for _, v in nnx.to_flat_state(state):
            for kind in sizes:
                if isinstance(v, kind):
                    sizes[kind] += v.get_value().size
    return sizes[nnx.Param], sizes[nnx.Param] + sizes[Frozen]
