"""Random initial values drawn as one flat vector, then reshaped."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def uniform(key: jax.Array, shape, minval: float = 0.0, maxval: float = 1.0,
            dtype=jnp.float32) -> jax.Array:
    """`jax.random.uniform(key, shape, dtype, minval, maxval)`, the same values bit for bit.

    Both of JAX's threefry layouts number the draws in row-major order, so drawing
    prod(shape) values and reshaping gives the array drawn with its shape. XLA's CPU backend
    compiles a draw of a rank-3 shape such as (2, 32, 9) in about 3 s and the flat draw in a
    tenth of that; an initialisation draws once per parameter (benchmarks/README.md, "On a
    CPU").
    """
    return jax.random.uniform(key, (math.prod(shape),), dtype, minval, maxval).reshape(shape)
