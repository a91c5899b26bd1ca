"""TSM2: MambaMixer for multivariate long-term forecasting (the MambaMixer paper's TSM2).

    x (B, Lin, M) -> RevIN -> [covariate steps appended on the time axis] -> patches
    (B, M, P, patch_len) -> Linear + positional embedding (B, M, P, d) -> Lyr MambaMixer layers
    (time mixer along P, variate mixer along M, weighted averaging) -> norm over (P, d)
    -> flatten -> Linear(P*d -> H) per variate -> RevIN undone -> (B, H, M)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmx_jax.layers import (
    Linear,
    MambaMixerStack,
    ResidualBlock,
    SelectiveChannelMixer,
    SelectiveTokenMixer,
)
from mmx_jax.layers.initializers import uniform

# The parameter paths of the mixer layers (and their averaging weights) for
# `optimizer.lr_scale_rules`: a regex on the model's parameter paths as `path_str` writes them
# ("mixer/token_blocks/0/..."; the syntax of `sharding.rules`, whose paths start at the state).
MIXER_PARAMS = r"^mixer/"


class RevIN(nnx.Module):
    """Reversible instance normalisation per variate over the time axis of (B, L, M)."""

    def __init__(self, num_variates: int, *, affine: bool = False, eps: float = 1e-5,
                 rngs: nnx.Rngs | None = None):
        del rngs
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((num_variates,))) if affine else None
        self.bias = nnx.Param(jnp.zeros((num_variates,))) if affine else None

    def normalize(self, x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """x: (B, L, M) -> (normalised x, statistics to undo it).

        Statistics are taken of x minus its last step, so a constant window normalises to
        exactly zero whatever the reduction order (no rounding noise amplified by 1/std).
        """
        shift = x[:, -1:]
        centred = x - shift
        mean = centred.mean(axis=1, keepdims=True)
        std = jnp.sqrt(jnp.mean((centred - mean) ** 2, axis=1, keepdims=True) + self.eps)
        x = (centred - mean) / std
        if self.weight is not None:
            x = x * self.weight[...] + self.bias[...]
        return x, (mean, std, shift)

    def denormalize(self, y: jax.Array, stats: tuple[jax.Array, ...]) -> jax.Array:
        mean, std, shift = stats
        if self.weight is not None:
            y = (y - self.bias[...]) / (self.weight[...] + self.eps**2)
        return (y * std + mean) + shift


def num_patches(length: int, patch_len: int, stride: int) -> int:
    """Patches of a `length`-step series end-padded with `stride` copies of its last step."""
    if length < patch_len:
        raise ValueError(f"TSM2: series of {length} steps is shorter than patch_len={patch_len}")
    return (length - patch_len) // stride + 2


def patchify(x: jax.Array, patch_len: int, stride: int) -> jax.Array:
    """(B, M, L) -> (B, M, P, patch_len), after repeating the last step `stride` times."""
    length = x.shape[-1]
    x = jnp.concatenate([x, jnp.repeat(x[..., -1:], stride, axis=-1)], axis=-1)
    starts = np.arange(num_patches(length, patch_len, stride)) * stride
    return x[..., starts[:, None] + np.arange(patch_len)[None, :]]


class FutureCovariates(nnx.Module):
    """Future covariates Z (B, Hz, Cz) -> (B, steps, M) extra input steps.

    Each covariate is a token with its Hz values as features (Linear Hz -> d), mixed with the
    others by a bidirectional channel mixer, then flattened and mapped to M variates x steps.
    """

    def __init__(self, num_covariates: int, horizon: int, num_variates: int, steps: int, *,
                 d_model: int, state_dim: int, impl: str, dtype, rngs: nnx.Rngs):
        self.shape = (steps, num_variates)
        self.embed = Linear(horizon, d_model, dtype=dtype, rngs=rngs)
        self.mixer = ResidualBlock(d_model, SelectiveChannelMixer(
            d_model, axis=-2, state_dim=state_dim, impl=impl, dtype=dtype, rngs=rngs),
            dtype=dtype, rngs=rngs)
        self.out = Linear(num_covariates * d_model, steps * num_variates, dtype=dtype,
                              rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        h = self.mixer(self.embed(jnp.swapaxes(z, 1, 2)))  # (B, Cz, d)
        return self.out(h.reshape(h.shape[0], -1)).reshape(-1, *self.shape)


class TSM2(nnx.Module):
    """Time Series MambaMixer.

    Args:
      num_variates: M.  seq_len: Lin.  pred_len: H.
      patch_len, stride: patching of each variate (end-padded by `stride` steps, PatchTST's way).
      d_model: d, features per patch.  num_layers: Lyr.  expand, state_dim: S6 widths (E, N).
      time_directions: 1 (the paper's text) or 2 (its figure) for the time mixer.
      revin, revin_affine: instance normalisation per variate.
      dropout: inside residual branches and after the embedding.  head_dropout: before the head.
      layer_scale: None, or the initial value of a learned per-feature scale on every residual
        branch (0: each mixer block starts as the identity, the model as its linear part).
      norm: "layernorm" or "rmsnorm".  learnable_averaging: train the weighted averaging.
      num_static, static_steps: static covariates S (B, num_static) -> (B, static_steps, M).
      num_future, future_steps: future covariates Z (B, pred_len, num_future) ->
        (B, future_steps, M).  Both are appended to the normalised series on the time axis.
      scan_impl: selective_scan implementation.  dtype: compute dtype (params stay float32).
    """

    def __init__(self, *, num_variates: int, seq_len: int, pred_len: int, patch_len: int = 16,
                 stride: int = 8, d_model: int = 64, num_layers: int = 2, expand: int = 2,
                 state_dim: int = 16, time_directions: int = 1, conv_width: int = 4,
                 revin: bool = True, revin_affine: bool = False, dropout: float = 0.1,
                 head_dropout: float = 0.0, layer_scale: float | None = None,
                 norm: str = "layernorm", learnable_averaging: bool = True,
                 num_static: int = 0, static_steps: int = 16,
                 num_future: int = 0, future_steps: int = 16, scan_impl: str = "auto",
                 dtype=None, rngs: nnx.Rngs):
        if time_directions not in (1, 2):
            raise ValueError(f"TSM2: time_directions={time_directions!r}, wanted 1 or 2")
        self.num_variates, self.seq_len, self.pred_len = num_variates, seq_len, pred_len
        self.patch_len, self.stride = patch_len, stride
        self.dtype = dtype
        self.revin = RevIN(num_variates, affine=revin_affine) if revin else None
        self.static = (Linear(num_static, static_steps * num_variates, dtype=dtype,
                                  rngs=rngs) if num_static else None)
        self.static_steps = static_steps if num_static else 0
        self.future = (FutureCovariates(num_future, pred_len, num_variates, future_steps,
                                        d_model=d_model, state_dim=state_dim, impl=scan_impl,
                                        dtype=dtype, rngs=rngs) if num_future else None)
        total = seq_len + self.static_steps + (future_steps if num_future else 0)
        self.num_patches = num_patches(total, patch_len, stride)
        self.patch_embed = Linear(patch_len, d_model, dtype=dtype, rngs=rngs)
        self.pos_embed = nnx.Param(uniform(rngs.params(), (self.num_patches, d_model),
                                           minval=-0.02, maxval=0.02))
        self.embed_dropout = nnx.Dropout(dropout, rngs=rngs)

        def block(mixer):
            return ResidualBlock(d_model, mixer, norm=norm, dropout=dropout,
                                 layer_scale=layer_scale, dtype=dtype, rngs=rngs)

        mixer_args = dict(expand=expand, state_dim=state_dim, conv_width=conv_width,
                          impl=scan_impl, dtype=dtype, rngs=rngs)
        self.mixer = MambaMixerStack(
            num_layers,
            lambda _: block(SelectiveTokenMixer(d_model, directions=time_directions,
                                                **mixer_args)),
            lambda _: block(SelectiveChannelMixer(d_model, axis=1, **mixer_args)),
            learnable_averaging=learnable_averaging)
        self.head_norm = nnx.LayerNorm(d_model, reduction_axes=(-2, -1), dtype=dtype, rngs=rngs)
        self.head_dropout = nnx.Dropout(head_dropout, rngs=rngs)
        self.head = Linear(self.num_patches * d_model, pred_len, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, static: jax.Array | None = None,
                 future: jax.Array | None = None) -> jax.Array:
        """x: (B, seq_len, M) [static: (B, num_static), future: (B, pred_len, num_future)]
        -> forecast (B, pred_len, M) in float32."""
        want = (self.seq_len, self.num_variates)
        if x.ndim != 3 or x.shape[1:] != want:
            raise ValueError(f"TSM2: input has shape {x.shape}, wanted (batch, {want[0]}, "
                             f"{want[1]})")
        if (static is None) != (self.static is None) or (future is None) != (self.future is None):
            raise ValueError("TSM2: pass `static` / `future` exactly when the model was built "
                             "with num_static / num_future")
        x = x.astype(jnp.float32)
        stats = None
        if self.revin is not None:
            x, stats = self.revin.normalize(x)
        steps = [x]
        if self.static is not None:
            steps.append(self.static(static).reshape(x.shape[0], self.static_steps, -1))
        if self.future is not None:
            steps.append(self.future(future))
        x = jnp.concatenate([s.astype(jnp.float32) for s in steps], axis=1)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        patches = patchify(jnp.swapaxes(x, 1, 2), self.patch_len, self.stride)  # (B, M, P, p)
        h = self.embed_dropout(self.patch_embed(patches) + self.pos_embed[...].astype(x.dtype))
        h = self.head_norm(self.mixer(h))  # (B, M, P, d)
        y = self.head(self.head_dropout(h.reshape(*h.shape[:2], -1)))  # (B, M, H)
        y = jnp.swapaxes(y, 1, 2).astype(jnp.float32)
        if stats is not None:
            y = self.revin.denormalize(y, stats)
        return y
