"""Linear-layer arithmetic arranged for XLA:CPU's matmuls, with unchanged results.

A linear layer's weight gradient, autodiff's dW = Xᵀ·dY, contracts X (B, T, I) with dY (B, T, O) over two axes
at once, which XLA:CPU runs as a slow generic contraction (shakespeare_char's step ~1.4x slower). `matmul` below
flattens the tokens first and computes dW as one two-dimensional product contracting the token axis
(`dot_general` with lhs_contracting_dims=(0,)), which XLA:CPU runs as one GEMM on the transposed operand, with no
copy in front. An earlier arrangement materialised Xᵀ and multiplied row-major (YNNPACK's fast path): on the AMD EPYC
(Zen 5) machines that run `make bench`, the transposing copies cost more than they saved (the nanoGPT-size step
24.8 → 21.2 ms, CPU 41.4 → 36.9 ms; benchmarks/RESULTS.md). Forward values and dX are what `jax.lax.dot_general`
gives; dW is the same sum.

`gelu` is the exact (erf) GELU in the erf form PyTorch uses; JAX's own exact GELU goes through erfc, which
XLA:CPU expands into a long, slow elementwise chain (about a tenth of the CPU training step of shakespeare_char).
"""

import jax
import jax.numpy as jnp
import numpy as np

_SQRT_HALF = float(np.sqrt(0.5))


def gelu(x):
    """Exact GELU, x·Φ(x) = x/2·(1 + erf(x/√2))."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype)))


@jax.custom_vjp
def matmul(x, kernel):
    """x (..., I) @ kernel (I, O), its weight gradient one 2-D product over the tokens (see the module docstring)."""
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _matmul_fwd(x, kernel):
    return matmul(x, kernel), (x, kernel)


def _matmul_bwd(res, dy):
    x, kernel = res
    dx = jax.lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())))
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dk = jax.lax.dot_general(x2, dy2, (((0,), (0,)), ((), ())))  # Σ over tokens of x ⊗ dy: (I, O)
    return dx, dk.astype(kernel.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dot_general(x, kernel, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
    """A drop-in `dot_general` for nnx.Linear (its `dot_general=` argument): the linear layer's own contraction
    (last axis of x with the kernel's first, no batch axes) goes through `matmul`; any other use, or one asking for
    a precision, an output type or an output sharding, is plain `jax.lax.dot_general`."""
    (lc, rc), (lb, rb) = dimension_numbers
    plain = (lb or rb or tuple(lc) != (x.ndim - 1,) or tuple(rc) != (0,) or kernel.ndim != 2
             or precision is not None or preferred_element_type is not None or out_sharding is not None)
    if plain:
        return jax.lax.dot_general(x, kernel, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type, out_sharding=out_sharding)
    return matmul(x, kernel)
