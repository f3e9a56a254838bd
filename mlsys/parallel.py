"""Meshes and sharding rules. Parameters and activations carry logical axis names (batch, embed, mlp, heads,
vocab, ...); the rules in conf/mesh map each name to mesh axes, separately for parameters and for activations.
Model code never names a mesh axis."""

import contextlib
import contextvars
import os
import shutil
import sys
import threading
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
    n = prod(shape.values())
    if n > n_devices:
        raise ConfigError(f"mesh.shape={dict(cfg.shape)} needs {n} devices but only {n_devices} exist; use "
                          f"sizes whose product is {n_devices} (one of them may be -1), or mesh=single")
    if 1 < n < n_devices:
        raise ConfigError(f"mesh.shape={dict(cfg.shape)} uses {n} of the {n_devices} devices; make the product "
                          f"{n_devices} (one size may be -1 = the rest), or use mesh=single for one device")
    return shape


def check_rules(cfg: MeshConfig) -> None:
    for group in ("param_rules", "act_rules"):
        for name, axes in getattr(cfg, group).items():
            bad = [a for a in axes if a not in MESH_AXES]
            if bad:
                raise ConfigError(f"mesh.{group}.{name}={list(axes)}: {bad} is not a mesh axis; the axes are "
                                  f"{list(MESH_AXES)}")


def check_param_names(abstract_state, rules: dict) -> None:
    """Every logical axis name a parameter carries must be in mesh.param_rules (mapped to [] to replicate)."""
    from flax import nnx

    for spec in jax.tree.leaves(nnx.get_partition_spec(abstract_state), is_leaf=lambda x: isinstance(x, P)):
        for name in spec:
            if name is not None and name not in rules:
                raise ConfigError(f"a parameter has logical axis {name!r}, which mesh.param_rules does not map; add "
                                  f"mesh.param_rules.{name}=[] (replicated) or a mesh axis")


def make_mesh(cfg: MeshConfig) -> jax.sharding.Mesh:
    shape = resolve_shape(cfg, jax.device_count())
    n = prod(shape.values())
    if jax.process_count() > 1 and n != jax.device_count():
        raise ConfigError(f"mesh.shape={dict(cfg.shape)} uses {n} of {jax.device_count()} devices; with several "
                          f"processes the mesh must use them all")
    # Device order: jax.make_mesh lays devices out so that the data axis spans processes (hosts) and the
    # inner axes (fsdp, tensor) stay within one, where the links are fastest.
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


# (mesh, act_rules) while a step is traced; model code calls `constrain` with logical names only.
_ACTIVATIONS: contextvars.ContextVar = contextvars.ContextVar("mlsys_activation_rules", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: jax.sharding.Mesh | None, rules: dict | None):
    """Within this block, `constrain` pins activations to the mesh by the activation rules (mesh=None: off)."""
    token = _ACTIVATIONS.set(None if mesh is None else (mesh, rules))
    try:
        yield
    finally:
        _ACTIVATIONS.reset(token)


def constrain(x, names: tuple):
    """Shard activation `x` by logical axis names (e.g. ("batch", "seq", "embed")); a no-op outside a training
    step (tests, notebooks, export) and under the shard_map step, where the layout is explicit."""
    ctx = _ACTIVATIONS.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    spec = fit_spec(logical_to_mesh(names, rules), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def data_parallel_size(mesh_shape: dict, rules: dict) -> int:
    return prod(mesh_shape[a] for a in rules.get("batch", []))


def bytes_per_device(tree) -> dict:
    """Bytes each device holds of a tree of arrays."""
    out: dict = {}
    for x in jax.tree.leaves(tree):
        for s in x.addressable_shards:
            out[s.device.id] = out.get(s.device.id, 0) + s.data.nbytes
    return out


def init_distributed(cfg) -> None:
    """Join the other processes of a multi-host run, before any device is touched. Sources, in order: the
    `dist` config; SLURM (jax detects it); a Kubernetes indexed Job (JOB_COMPLETION_INDEX, with MLSYS_COORDINATOR
    and MLSYS_NUM_PROCESSES set by the manifest). One process and no cluster: nothing to do."""
    from mlsys.errors import MlsysError

    env = os.environ
    if cfg.num_processes > 1:
        if not cfg.coordinator:
            raise ConfigError(f"dist.num_processes={cfg.num_processes} needs dist.coordinator=HOST:PORT (process 0)")
        if not 0 <= cfg.process_id < cfg.num_processes:
            raise ConfigError(f"dist.process_id={cfg.process_id}: must be in [0, {cfg.num_processes})")
        kwargs = dict(coordinator_address=cfg.coordinator, num_processes=cfg.num_processes, process_id=cfg.process_id)
    elif int(env.get("SLURM_NTASKS", "1")) > 1:
        kwargs = {}  # jax reads the SLURM variables itself
    elif "JOB_COMPLETION_INDEX" in env and int(env.get("MLSYS_NUM_PROCESSES", "1")) > 1:
        kwargs = dict(coordinator_address=env["MLSYS_COORDINATOR"], num_processes=int(env["MLSYS_NUM_PROCESSES"]),
                      process_id=int(env["JOB_COMPLETION_INDEX"]))
    else:
        return
    if jax.distributed.is_initialized():
        return
    where = kwargs.get("coordinator_address", "the SLURM coordinator")
    message = (f"error: could not join the other processes at {where} within dist.timeout_s={cfg.timeout_s} s. "
               f"Start every process with the same dist.coordinator and dist.num_processes, check that process 0 "
               f"is running and that its port is reachable.")

    # JAX's client aborts the whole process (a C++ fatal error and a stack dump) when the group does not form in
    # time. A watchdog that fires first turns that into one clear line and exit code 2.
    def give_up():
        print(message, file=sys.stderr, flush=True)
        os._exit(2)

    watchdog = threading.Timer(cfg.timeout_s, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=cfg.timeout_s + 60)
    except Exception as e:  # a refused or malformed address raises instead
        raise MlsysError(f"{message[7:]} ({str(e).strip().splitlines()[0][:300] if str(e).strip() else e!r})") \
            from None
    finally:
        watchdog.cancel()


def shared_run_dir(local_dir: str) -> str:
    """Process 0's run dir, agreed by every process (each Hydra process made its own, with its own suffix)."""
    if jax.process_count() == 1:
        return local_dir
    from jax.experimental import multihost_utils

    buf = np.zeros(1024, np.uint8)
    raw = os.path.abspath(local_dir).encode()
    buf[: len(raw)] = np.frombuffer(raw, np.uint8)
    agreed = bytes(multihost_utils.broadcast_one_to_all(buf)).rstrip(b"\0").decode()
    if agreed != os.path.abspath(local_dir) and os.path.isdir(local_dir):
        # This process's own Hydra dir holds only Hydra's copy of the config and a log: drop it.
        shutil.rmtree(local_dir, ignore_errors=True)
    return agreed
