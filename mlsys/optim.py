"""The optimizer: an optax chain of global-norm clipping, AdamW or SGD, and a warmup + decay schedule.
Weight decay skips parameters whose path matches any of `decay_exclude` (norms, biases, embeddings by default)."""

import re
from dataclasses import dataclass, field

import jax
import optax

OPTIMIZERS = ("adamw", "sgd")
DECAYS = ("cosine", "linear", "constant")


@dataclass
class OptimConfig:
    name: str = "adamw"  # one of OPTIMIZERS
    lr: float = 1e-3  # peak learning rate, reached after warmup_steps
    min_lr: float = 0.0  # learning rate at the end of the decay
    warmup_steps: int = 0
    decay: str = "cosine"  # one of DECAYS
    decay_steps: int = 0  # 0 = trainer.steps
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    weight_decay: float = 0.0  # decoupled (AdamW); added to the gradient for SGD
    decay_exclude: list[str] = field(default_factory=lambda: ["bias", "scale", "embedding"])
    clip_norm: float = 1.0  # global-norm clipping; 0 = off


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    decay_steps = max((cfg.decay_steps or total_steps) - cfg.warmup_steps, 1)
    if cfg.decay == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr / cfg.lr)
    elif cfg.decay == "linear":
        decay = optax.linear_schedule(cfg.lr, cfg.min_lr, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if cfg.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def path_str(path) -> str:
    parts = []
    for k in path:
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        if name != "value":  # nnx.Variable's own field, not part of the parameter's name
            parts.append(str(name))
    return "/".join(parts)


def decay_mask(cfg: OptimConfig, params):
    patterns = [re.compile(p) for p in cfg.decay_exclude]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(p.search(path_str(path)) for p in patterns), params)


def make_optimizer(cfg: OptimConfig, total_steps: int, params, clip: bool = True
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax chain and its learning-rate schedule. clip=False leaves global-norm clipping to the caller (the
    shard_map step clips with a norm summed across parameter slices)."""
    lr = schedule(cfg, total_steps)
    mask = decay_mask(cfg, params)
    if cfg.name == "adamw":
        opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask)
    else:
        opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=mask),
                          optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
    # Without clipping here the slot holds optax.identity(): its (empty) state has the same structure, so a
    # checkpoint of the shard_map step restores under the jit step (export, a resume with trainer.step=jit).
    chain = [(optax.clip_by_global_norm(cfg.clip_norm) if clip else optax.identity())] if cfg.clip_norm > 0 else []
    return optax.chain(*chain, opt), lr
