"""The MambaMixer stack: residual token and channel blocks with weighted averaging of all
earlier features (the paper's weighted averaging).

Layer l = 1..Lyr:

    x_tok(l) = sum_{i<l}  alpha[l,i] y_tok(i) + sum_{i<l} beta[l,i]  y_ch(i)
    x_ch(l)  = sum_{i<=l} theta[l,i] y_tok(i) + sum_{i<l} gamma[l,i] y_ch(i)
    y_tok(l) = TokenBlocks(x_tok(l)),    y_ch(l) = x_ch(l) + ChannelMixer(Norm(x_ch(l)))

with y_tok(0) = y_ch(0) = the embedded input and Lyr(2 Lyr + 3) scalars in all, initialised to
the plain residual chain (beta[l,l-1] = theta[l,l] = 1, every other weight 0).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class AveragingWeights(nnx.Variable):
    """Frozen weighted-averaging scalars: a Variable that is not an `nnx.Param`."""


def averaging_layout(num_layers: int) -> list[dict[str, slice]]:
    """Where layer l's alpha (l), beta (l), theta (l+1) and gamma (l) sit in the flat vector."""
    layout, offset = [], 0
    for layer in range(1, num_layers + 1):
        entry = {}
        for name, size in (("alpha", layer), ("beta", layer), ("theta", layer + 1),
                           ("gamma", layer)):
            entry[name] = slice(offset, offset + size)
            offset += size
        layout.append(entry)
    assert offset == num_layers * (2 * num_layers + 3)
    return layout


def residual_init(num_layers: int) -> np.ndarray:
    """The plain residual chain: x_tok(l) = y_ch(l-1) and x_ch(l) = y_tok(l)."""
    weights = np.zeros(num_layers * (2 * num_layers + 3), np.float32)
    for layer, entry in enumerate(averaging_layout(num_layers), start=1):
        weights[entry["beta"].start + layer - 1] = 1.0
        weights[entry["theta"].start + layer] = 1.0
    return weights


def make_norm(kind: str, dim: int, *, dtype=None, rngs: nnx.Rngs) -> nnx.Module:
    """LayerNorm ("layernorm") or RMSNorm ("rmsnorm") over the last axis, computed in float32."""
    match kind:
        case "layernorm":
            return nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
        case "rmsnorm":
            return nnx.RMSNorm(dim, dtype=dtype, rngs=rngs)
    raise ValueError(f"norm={kind!r} is not 'layernorm' or 'rmsnorm'")


class DropPath(nnx.Module):
    """Stochastic depth: drops a whole residual branch per sample (identity when rate = 0)."""

    def __init__(self, rate: float, *, rngs: nnx.Rngs):
        self.dropout = nnx.Dropout(rate, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.dropout.rate == 0:
            return x
        return x * self.dropout(jnp.ones((x.shape[0],) + (1,) * (x.ndim - 1), x.dtype))


class ResidualBlock(nnx.Module):
    """x + DropPath(Dropout(scale * mixer(Norm(x)))).

    ``layer_scale``: None (no scale) or the initial value of a learned per-feature scale of the
    branch (CaiT's LayerScale); 0 starts the block as the identity.
    """

    def __init__(self, dim: int, mixer: nnx.Module, *, norm: str = "layernorm",
                 dropout: float = 0.0, drop_path: float = 0.0, layer_scale: float | None = None,
                 dtype=None, rngs: nnx.Rngs):
        self.norm = make_norm(norm, dim, dtype=dtype, rngs=rngs)
        self.mixer = mixer
        self.scale = None if layer_scale is None else nnx.Param(jnp.full((dim,), layer_scale))
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.drop_path = DropPath(drop_path, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        branch = self.mixer(self.norm(x))
        if self.scale is not None:
            branch = branch * self.scale[...].astype(branch.dtype)
        return x + self.drop_path(self.dropout(branch)).astype(x.dtype)


class MambaMixerStack(nnx.Module):
    """Lyr MambaMixer layers with weighted averaging of earlier features.

    Args:
      num_layers: Lyr.
      make_token_blocks: layer index (0-based) -> module mapping x_tok to y_tok (one or more
        residual token blocks, applied in sequence).
      make_channel_block: layer index -> residual channel block mapping x_ch to y_ch.
      learnable_averaging: train the Lyr(2Lyr+3) scalars; False freezes them at the plain
        residual chain (the paper's ablation).
    """

    def __init__(self, num_layers: int, make_token_blocks: Callable[[int], nnx.Module],
                 make_channel_block: Callable[[int], nnx.Module], *,
                 learnable_averaging: bool = True):
        self.num_layers = num_layers
        self.token_blocks = nnx.List([make_token_blocks(i) for i in range(num_layers)])
        self.channel_blocks = nnx.List([make_channel_block(i) for i in range(num_layers)])
        kind = nnx.Param if learnable_averaging else AveragingWeights
        # No layers, no weights (and no zero-size array for a checkpoint to refuse).
        self.averaging = kind(jnp.asarray(residual_init(num_layers))) if num_layers else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: the embedded input -> y_ch(Lyr), same shape (x itself when Lyr is 0)."""
        if self.averaging is None:
            return x
        weights = self.averaging[...]
        y_tok, y_ch = [x], [x]

        def combine(slc, ys):
            w = weights[slc].astype(x.dtype)
            return sum(w[i] * y for i, y in enumerate(ys))

        for layer, entry in enumerate(averaging_layout(self.num_layers), start=1):
            x_tok = combine(entry["alpha"], y_tok) + combine(entry["beta"], y_ch)
            y_tok.append(self.token_blocks[layer - 1](x_tok))
            x_ch = combine(entry["theta"], y_tok) + combine(entry["gamma"], y_ch)
            y_ch.append(self.channel_blocks[layer - 1](x_ch))
        return y_ch[-1]
