"""Meshes and sharding rules. Parameters and activations carry logical axis names (batch, embed, mlp, heads,
vocab, ...); the rules in conf/mesh map each name to mesh axes, separately for parameters and for activations.
Model code never names a mesh axis."""

from dataclasses import dataclass, field
from math import prod

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from mlsys.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")


@dataclass
class MeshConfig:
    # Size of each mesh axis; one axis may be -1 (= the devices left over).
    shape: dict[str, int] = field(default_factory=lambda: {"data": 1, "fsdp": 1, "tensor": 1})
    # logical name -> mesh axes, for parameters (and optimizer state).
    param_rules: dict[str, list[str]] = field(default_factory=lambda: {
        "embed": ["fsdp"], "mlp": ["tensor"], "heads": ["tensor"], "vocab": ["tensor"]})
    # logical name -> mesh axes, for activations and input batches.
    act_rules: dict[str, list[str]] = field(default_factory=lambda: {
        "batch": ["data", "fsdp"], "mlp": ["tensor"], "heads": ["tensor"], "vocab": ["tensor"]})


def resolve_shape(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    """The mesh axis sizes with -1 filled in; a ConfigError if they do not fit n_devices."""
    unknown = set(cfg.shape) - set(MESH_AXES)
    if unknown:
        raise ConfigError(f"mesh.shape has unknown axes {sorted(unknown)}; the axes are {list(MESH_AXES)}")
    shape = {a: int(cfg.shape.get(a, 1)) for a in MESH_AXES}
    free = [a for a, s in shape.items() if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in shape.values()):
        raise ConfigError(f"mesh.shape={dict(cfg.shape)}: sizes must be positive, with at most one -1")
    fixed = prod(s for s in shape.values() if s != -1)
    if free:
        if n_devices % fixed:
            raise ConfigError(f"mesh.shape={dict(cfg.shape)}: {n_devices} devices do not divide by {fixed}; "
                              f"choose sizes whose product divides {n_devices}")
        shape[free[0]] = n_devices // fixed
    if prod(shape.values()) > n_devices:
        raise ConfigError(f"mesh.shape={dict(cfg.shape)} needs {prod(shape.values())} devices but only "
                          f"{n_devices} exist; use mesh=single, or sizes whose product is at most {n_devices}")
    return shape


def make_mesh(cfg: MeshConfig) -> jax.sharding.Mesh:
    shape = resolve_shape(cfg, jax.device_count())
    n = prod(shape.values())
    if jax.process_count() > 1 and n != jax.device_count():
        raise ConfigError(f"mesh.shape={dict(cfg.shape)} uses {n} of {jax.device_count()} devices; with several "
                          f"processes the mesh must use them all")
    # Auto axes: GSPMD propagates shardings through ordinary ops (Explicit axes would demand them everywhere).
    return jax.make_mesh(tuple(shape.values()), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=jax.devices()[:n])


def logical_to_mesh(spec, rules: dict) -> P:
    """PartitionSpec of logical names → PartitionSpec of mesh axes. A mesh axis is used at most once per array."""
    used, out = set(), []
    for name in spec:
        axes = [a for a in (rules.get(name) or []) if a not in used] if name else []
        used.update(axes)
        out.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return P(*out)


def fit_spec(spec: P, shape: tuple, mesh: jax.sharding.Mesh) -> P:
    """Drop mesh axes from dimensions they do not divide (a 10-class head stays whole on a 4-way axis)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = prod(mesh.shape[a] for a in names)
        out.append(axes if names and dim % size == 0 else None)
    return P(*out)


def param_shardings(abstract_state, mesh: jax.sharding.Mesh, rules: dict):
    """NamedShardings for an nnx.State of abstract arrays, from their logical partition metadata."""
    from flax import nnx

    specs = nnx.get_partition_spec(abstract_state)
    return jax.tree.map(
        lambda x, s: NamedSharding(mesh, fit_spec(logical_to_mesh(s, rules), x.shape, mesh)),
        abstract_state, specs)


def batch_sharding(mesh: jax.sharding.Mesh, rules: dict) -> NamedSharding:
    """Input batches are split along their first (batch) dimension."""
    return NamedSharding(mesh, logical_to_mesh(("batch",), rules))


def data_parallel_size(mesh_shape: dict, rules: dict) -> int:
    return prod(mesh_shape[a] for a in rules.get("batch", []))


def bytes_per_device(tree) -> dict:
    """Bytes each device holds of a tree of arrays."""
    out: dict = {}
    for x in jax.tree.leaves(tree):
        for s in x.addressable_shards:
            out[s.device.id] = out.get(s.device.id, 0) + s.data.nbytes
    return out


def host_array(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))
