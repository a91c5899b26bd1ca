"""The model zoo: named constructors with their default arguments."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

_REGISTRY: dict[str, tuple[Callable[..., nnx.Module], dict[str, Any]]] = {}


def register_model(name: str, constructor: Callable[..., nnx.Module], **defaults: Any) -> None:
    """Registers `constructor(**defaults, **overrides, rngs=...)` under `name`."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = (constructor, defaults)


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, *, pretrained: bool = False, rngs: nnx.Rngs | None = None,
                 **overrides: Any) -> nnx.Module:
    """An initialised NNX module for the registered `name` (seed 0 unless `rngs` is given),
    or, with `pretrained=True`, the pretrained zoo's entry `name` in evaluation mode
    (`mmx_jax.models.pretrained`)."""
    if pretrained:
        from mmx_jax.models.pretrained import load_pretrained  # noqa: PLC0415

        if overrides or rngs is not None:
            raise ValueError("create_model(pretrained=True) takes no model arguments: the "
                             "entry's card fixes them")
        return load_pretrained(name)[0]
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    constructor, defaults = _REGISTRY[name]
    return constructor(**{**defaults, **overrides}, rngs=rngs or nnx.Rngs(0))


def count_params(model: nnx.Module) -> int:
    """Number of trainable scalars (`nnx.Param` leaves) of a module."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
