"""A Linear layer that multiplies as one 2-D matrix product, whatever the input's rank."""

from __future__ import annotations

import jax
from flax import nnx


class Linear(nnx.Linear):
    """`nnx.Linear` (same parameters, names and values) over the last axis of (..., in_features).

    The leading axes are flattened into one before the product and restored after it. The
    gradient of the kernel then contracts one axis, a plain matmul; contracting several
    leading axes made XLA's CPU backend first transpose the input into a (in_features, rows)
    copy, element by element, which took several times the matmul itself (benchmarks/README.md,
    "On a CPU").
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        lead = x.shape[:-1]
        return super().__call__(x.reshape(-1, x.shape[-1])).reshape(*lead, -1)
