"""Training-time image augmentation (data.augment), run on the device inside the jitted train step.

Each example's randomness is a function of (run seed, step, row of the global batch) only: the same run gives the
same augmented batches on any mesh and any number of processes, and a resumed run continues them exactly, with
no state beyond the step counter that every checkpoint already holds. Evaluation never augments (the eval step
does not call this).

- "crop": random resized crop (Szegedy et al. 2015, as torchvision's RandomResizedCrop): a box of area
  data.crop_scale x the image and aspect ratio in [3/4, 4/3] at a random place, resized back to the full size;
- "flip": horizontal flip with probability 1/2.
"""

from math import log

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

RATIO = (3 / 4, 4 / 3)
AUGMENT_STREAM = 0xA06  # folded into the run seed: a stream apart from the one that initialises the parameters


def random_resized_crop(x: Float[Array, "H W C"], key, scale: tuple[float, float]) -> Float[Array, "H W C"]:
    h, w = x.shape[0], x.shape[1]
    k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
    area = jax.random.uniform(k_area, (), minval=scale[0], maxval=scale[1])
    ratio = jnp.exp(jax.random.uniform(k_ratio, (), minval=log(RATIO[0]), maxval=log(RATIO[1])))
    ch = jnp.clip(jnp.sqrt(area / ratio) * h, 1.0, h)  # crop height and width in pixels (fractional)
    cw = jnp.clip(jnp.sqrt(area * ratio) * w, 1.0, w)
    y0 = jax.random.uniform(k_y, ()) * (h - ch)
    x0 = jax.random.uniform(k_x, ()) * (w - cw)
    # Output pixel p samples the input at p / s + offset: the box [y0, y0 + ch) fills the whole output.
    s = jnp.stack([h / ch, w / cw])
    return jax.image.scale_and_translate(x, x.shape, (0, 1), s, -jnp.stack([y0, x0]) * s, method="linear",
                                         antialias=False)


def augmenter(names: list[str], crop_scale, seed: int):
    """`augment(images (B, H, W, C), step) -> images`, or None when `names` is empty."""
    if not names:
        return None
    scale = (float(crop_scale[0]), float(crop_scale[1]))

    def one(x, key):
        k_crop, k_flip = jax.random.split(key)
        if "crop" in names:
            x = random_resized_crop(x, k_crop, scale)
        if "flip" in names:
            x = jnp.where(jax.random.bernoulli(k_flip), x[:, ::-1], x)
        return x

    def augment(images: Float[Array, "B H W C"], step) -> Float[Array, "B H W C"]:
        base = jax.random.fold_in(jax.random.key(seed), AUGMENT_STREAM)
        keys = jax.random.split(jax.random.fold_in(base, step), images.shape[0])
        return jax.vmap(one)(images, keys).astype(images.dtype)

    return augment


def with_augment(train_step, augment):
    """The train step, its batch's inputs augmented first (keyed on the state's step counter)."""
    if augment is None:
        return train_step

    def step(state, batch: dict):
        return train_step(state, {**batch, "inputs": augment(batch["inputs"], state.step)})

    return step
