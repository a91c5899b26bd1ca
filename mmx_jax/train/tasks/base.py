"""What every task shares: the batch sizes and the model named by the config.

A task builds the model from the config, plans the global batches of an epoch, loads the
rows of a batch this process holds, and defines the training loss and the evaluation sums
(masked, so a padded last batch counts only its real rows).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from mmx_jax.models import create_model


def compute_dtype(name: str):
    """"float32" or "bfloat16" (config strings) -> a jnp dtype."""
    try:
        return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]
    except KeyError:
        raise ValueError(f"model.dtype={name!r} is not 'float32' or 'bfloat16'") from None


class Task:
    """What every task takes from its config: the batch sizes and the registry model."""

    config: Any

    @property
    def train_batch_size(self) -> int:
        return self.config.data.batch_size

    @property
    def eval_batch_size(self) -> int:
        return self.config.data.eval_batch_size

    def _create_model(self, rngs: nnx.Rngs, **data_shapes) -> nnx.Module:
        """`config.model` names the model and its arguments; the data fixes its shapes."""
        m = self.config.model.to_dict()
        name, dtype = m.pop("name"), compute_dtype(m.pop("dtype"))
        return create_model(name, dtype=None if dtype == jnp.float32 else dtype, rngs=rngs,
                            **data_shapes, **m)

    def check_splits(self) -> None:
        """Warns about splits too small to measure much (once the batch sizes are known to
        fit)."""
