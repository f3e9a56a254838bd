"""Pure step functions. One train step serves every mesh: shardings are given to jit, not written here."""

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jaxtyping import Array, Float, Int

from mlsys.train.state import TrainState


def cross_entropy(logits: Float[Array, "B *T C"], targets: Int[Array, "B *T"]):
    """Per-example (or per-token) loss and correctness, in float32."""
    logits = logits.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return loss, (jnp.argmax(logits, -1) == targets).astype(jnp.float32)


PACKING_KEYS = ("segment_ids", "positions")  # packed language-model batches (mlsys/data/packing.py)


def forward(model: nnx.Module, batch: dict):
    """Per-example (or per-token) loss, correctness and weights. A packed batch (data.packing=segments) passes its
    segment ids and positions to the model, and its padding (segment id 0) gets weight 0."""
    extra = {k: batch[k] for k in PACKING_KEYS if k in batch}
    loss, correct = cross_entropy(model(batch["inputs"], **extra), batch["targets"])
    weight = (batch["segment_ids"] != 0).astype(jnp.float32) if "segment_ids" in batch else jnp.ones_like(loss)
    return loss, correct, weight


def loss_fn(model: nnx.Module, batch: dict):
    """Mean loss and accuracy over the real tokens (examples) of the batch."""
    loss, correct, weight = forward(model, batch)
    n = jnp.maximum(weight.sum(), 1.0)
    return (loss * weight).sum() / n, (correct * weight).sum() / n


def bits_per_byte(loss, batch: dict):
    """Mean loss per token (nats) → bits per UTF-8 byte of the text the batch's targets cover: independent of the
    tokenizer, so runs with different tokenizers compare. Needs the batch's `target_bytes`."""
    n = (batch["segment_ids"] != 0).sum() if "segment_ids" in batch else batch["targets"].size
    return loss * n / (jnp.log(2.0) * jnp.maximum(batch["target_bytes"].sum(), 1))


def micro_batches(batch: dict, k: int) -> dict:
    """(B, ...) → (k, B/k, ...), micro-batch j holding rows j, j+k, j+2k, ...: each device keeps its own rows, so
    splitting a data-parallel batch moves nothing between devices."""
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1), batch)


def loss_and_grads(model: nnx.Module, batch: dict, grad_accum: int = 1):
    """((mean loss, mean accuracy), gradients w.r.t. nnx.Param) of the batch; with grad_accum = k the batch runs
    as k micro-batches under lax.scan (activations of one micro-batch alive at a time) and the result equals the
    whole batch's. The model's other state (RNG counters, batch statistics) advances in place."""
    if grad_accum == 1:
        return nnx.value_and_grad(loss_fn, has_aux=True)(model, batch)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def body(carry, micro):
        params, rest, grads, loss, acc = carry  # params ride in the carry: NNX merges values of this trace only
        m = nnx.merge(graphdef, params, rest)
        (l, a), g = nnx.value_and_grad(loss_fn, has_aux=True)(m, micro)
        _, _, rest = nnx.split(m, nnx.Param, ...)
        return (params, rest, jax.tree.map(jnp.add, grads, g), loss + l, acc + a), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    init = (params, rest, zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (_, rest, grads, loss, acc), _ = jax.lax.scan(body, init, micro_batches(batch, grad_accum))
    nnx.update(model, rest)
    return (loss / grad_accum, acc / grad_accum), jax.tree.map(lambda g: g / grad_accum, grads)


def is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def skip_unless(ok, new: TrainState, old: TrainState) -> TrainState:
    """trainer.on_nan=skip, decided on the device (no host sync): where `ok` is false the parameters, optimizer
    state (its step count included) and batch statistics stay as they were. The step counter and the RNG streams
    advance either way, so the next step reads the next batch and draws fresh dropout masks."""
    def pick(n, o):
        return n if is_key(n) else jnp.where(ok, n, o)

    def pick_float(n, o):  # RNG counters are integers and advance; batch statistics are floats and are kept
        return pick(n, o) if jnp.issubdtype(n.dtype, jnp.floating) else n

    return new.replace(params=jax.tree.map(pick, new.params, old.params),
                       opt_state=jax.tree.map(pick, new.opt_state, old.opt_state),
                       rest=jax.tree.map(pick_float, new.rest, old.rest))


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, lr_schedule, grad_accum: int = 1,
                    on_nan: str = "stop"):
    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        # Merge inside the trace so that NNX may advance RNG counters and batch statistics; gradients are taken
        # with respect to nnx.Param only.
        model = nnx.merge(graphdef, state.params, state.rest)
        (loss, acc), grads = loss_and_grads(model, batch, grad_accum)
        _, _, rest = nnx.split(model, nnx.Param, ...)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "accuracy": acc, "grad_norm": optax.global_norm(grads),
                   "lr": lr_schedule(state.step)}
        if "target_bytes" in batch:
            metrics["bits_per_byte"] = bits_per_byte(loss, batch)
        new = state.replace(step=state.step + 1, params=params, rest=rest, opt_state=opt_state)
        if on_nan == "skip":  # the host tells skipped steps by the same test on the fetched metrics
            new = skip_unless(jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"]), new, state)
        return new, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef):
    def eval_step(params, rest, batch: dict) -> dict:
        """Sums over the real (mask = 1) rows; the caller divides by the count."""
        loss, correct, weight = forward(nnx.merge(graphdef, params, rest), batch)
        mask = batch["mask"].reshape(batch["mask"].shape + (1,) * (loss.ndim - 1))
        mask = jnp.broadcast_to(mask, loss.shape) * weight
        sums = {"loss": (loss * mask).sum(), "accuracy": (correct * mask).sum(), "count": mask.sum()}
        if "target_bytes" in batch:  # language models: UTF-8 bytes of the text the targets cover (bits per byte)
            sums["bytes"] = (batch["target_bytes"] * batch["mask"]).sum()
        return sums

    return eval_step
