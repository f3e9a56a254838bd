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


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, lr_schedule):
    def loss_fn(model: nnx.Module, batch: dict):
        loss, correct = cross_entropy(model(batch["inputs"]), batch["targets"])
        return loss.mean(), correct.mean()

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        # Merge inside the trace so that NNX may advance RNG counters and batch statistics; gradients are taken
        # with respect to nnx.Param only.
        model = nnx.merge(graphdef, state.params, state.rest)
        (loss, acc), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch)
        _, _, rest = nnx.split(model, nnx.Param, ...)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "accuracy": acc, "grad_norm": optax.global_norm(grads),
                   "lr": lr_schedule(state.step)}
        return state.replace(step=state.step + 1, params=params, rest=rest, opt_state=opt_state), metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef):
    def eval_step(params, rest, batch: dict) -> dict:
        """Sums over the real (mask = 1) rows; the caller divides by the count."""
        loss, correct = cross_entropy(nnx.merge(graphdef, params, rest)(batch["inputs"]), batch["targets"])
        mask = batch["mask"].reshape(batch["mask"].shape + (1,) * (loss.ndim - 1))
        mask = jnp.broadcast_to(mask, loss.shape)
        return {"loss": (loss * mask).sum(), "accuracy": (correct * mask).sum(), "count": mask.sum()}

    return eval_step
