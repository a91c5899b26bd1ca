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

    def model_shapes(self) -> dict[str, Any]:
        """The model arguments the data fixes (e.g. num_variates, num_classes)."""
        raise NotImplementedError

    def create_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return create_task_model(self.config, self.model_shapes())(rngs)

    def describe(self) -> dict[str, Any]:
        """What a trained model needs to know of its data to be used without it (saved as
        workdir/data.json): the model's shapes, and how inputs are scaled and outputs named."""
        raise NotImplementedError

    def check_splits(self) -> None:
        """Warns about splits too small to measure much (once the batch sizes are known to
        fit)."""


def model_spec(config, shapes: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(registry name, arguments) of the model `config.model` names, with the shapes the data
    fixes: `create_model(name, rngs=..., **arguments)` builds it."""
    m = config.model.to_dict()
    name, dtype = m.pop("name"), compute_dtype(m.pop("dtype"))
    return name, {**m, **shapes, **({} if dtype == jnp.float32 else {"dtype": dtype})}


def create_task_model(config, shapes: dict[str, Any]):
    """``create(rngs) -> model``: the model of `model_spec`."""
    name, arguments = model_spec(config, shapes)

    def create(rngs: nnx.Rngs) -> nnx.Module:
        return create_model(name, rngs=rngs, **arguments)

    return create
