"""S6: the parameters of K selective-scan directions (Mamba's S6), run as one scan call."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmx_jax.layers.initializers import uniform
from mmx_jax.ssm import selective_scan, selective_scan_2d


def dt_bias_init(key: jax.Array, shape, dt_min: float, dt_max: float,
                 floor: float) -> jax.Array:
    """Mamba's step-size bias: dt log-uniform in [dt_min, dt_max], >= floor; softplus^-1(dt)."""
    u = uniform(key, shape)
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, floor)
    return dt + jnp.log(-jnp.expm1(-dt))  # inverse of softplus


def s4d_real_log(num_channels: int, state_dim: int) -> np.ndarray:
    """S4D-real initialisation of A_log: A_log[e, n] = log(n + 1), so A = -(n + 1)."""
    return np.log(np.tile(np.arange(1, state_dim + 1, dtype=np.float32), (num_channels, 1)))


def per_direction_linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """x: (..., K, I), w: (K, I, O) -> (..., K, O): each of K directions its own matrix.

    For K <= 2 this is one 2-D matmul of the flattened rows with a block-diagonal (K*I, K*O)
    matrix: the batched product with K as the batch axis made XLA's CPU backend transpose x to
    put K first, which cost more than the matmul (benchmarks/README.md, "On a CPU"), and so
    does a product over several leading axes (see `Linear`); the zero blocks double a small
    product at most.
    """
    k, i, o = w.shape
    if k > 2:
        return jnp.einsum("...ki,kio->...ko", x, w)
    eye = jnp.eye(k, dtype=w.dtype)
    block_diagonal = (eye[:, None, :, None] * w[:, :, None, :]).reshape(k * i, k * o)
    return (x.reshape(-1, k * i) @ block_diagonal).reshape(*x.shape[:-2], k, o)


class S6(nnx.Module):
    """K independent S6 directions over E channels, evaluated by ONE `selective_scan` call.

    The directions are stacked on the channel axis (K*E channels) with B and C as K groups,
    which is exactly the grouped-B/C case of the scan: each direction keeps its own A, D and
    step-size bias without any per-direction loop.

    Args:
      channels: E, the inner width of one direction.
      num_directions: K.
      state_dim: N.
      dt_rank: rank of the step-size projection; "auto" is ceil(model_dim / 16).
      model_dim: D, used only for dt_rank="auto".
      directions_per_A: consecutive directions sharing one A_log (E, N): 1 (each its own),
        2 (forward/backward pairs of quasi-separable scans), K (all of them).
      use_D: learn a skip D per direction (off when the caller adds its own skip).
    """

    def __init__(self, channels: int, *, num_directions: int = 1, state_dim: int = 16,
                 dt_rank: int | str = "auto", model_dim: int | None = None,
                 dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4,
                 directions_per_A: int = 1, use_D: bool = True, impl: str = "auto",
                 dtype=None, rngs: nnx.Rngs):
        if dt_rank == "auto":
            dt_rank = math.ceil((model_dim or channels) / 16)
        k, e, n, r = num_directions, channels, state_dim, int(dt_rank)
        self.num_directions, self.channels, self.state_dim, self.dt_rank = k, e, n, r
        self.impl, self.dtype = impl, dtype
        # torch.nn.Linear's default init, as in Mamba: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        self.x_proj = nnx.Param(uniform(rngs.params(), (k, e, r + 2 * n), minval=-1,
                                        maxval=1) / math.sqrt(e))
        self.dt_proj = nnx.Param(uniform(rngs.params(), (k, r, e), minval=-1,
                                         maxval=1) / math.sqrt(r))
        self.dt_bias = nnx.Param(dt_bias_init(rngs.params(), (k, e), dt_min, dt_max,
                                              dt_init_floor))
        if k % directions_per_A:
            raise ValueError(f"S6: directions_per_A={directions_per_A} does not divide "
                             f"num_directions={k}")
        self.directions_per_A = directions_per_A
        self.A_log = nnx.Param(jnp.asarray(np.broadcast_to(
            s4d_real_log(e, n), (k // directions_per_A, e, n))))
        self.D = nnx.Param(jnp.ones((k, e))) if use_D else None

    def _A(self) -> jax.Array:
        """(K, E, N) float32, each direction's A (pairs share one with directions_per_A=2)."""
        return -jnp.exp(jnp.repeat(self.A_log[...].astype(jnp.float32), self.directions_per_A,
                                   axis=0))

    def __call__(self, u: jax.Array) -> jax.Array:
        """u: (B, L, K, E), each direction already in its own scan order -> y (B, L, K, E)."""
        b, length, k, e = u.shape
        if (k, e) != (self.num_directions, self.channels):
            raise ValueError(f"S6: input has shape {u.shape}, wanted (B, L, "
                             f"{self.num_directions}, {self.channels})")
        dtype = self.dtype or u.dtype
        u = u.astype(dtype)
        x_dbl = per_direction_linear(u, self.x_proj[...].astype(dtype))
        r, n = self.dt_rank, self.state_dim
        dt, Bm, Cm = x_dbl[..., :r], x_dbl[..., r:r + n], x_dbl[..., r + n:]
        delta = per_direction_linear(dt, self.dt_proj[...].astype(dtype))
        A = self._A()
        y = selective_scan(
            u.reshape(b, length, k * e), delta.reshape(b, length, k * e), A.reshape(k * e, n),
            Bm, Cm, D=None if self.D is None else self.D[...].reshape(k * e),
            delta_bias=self.dt_bias[...].reshape(k * e), delta_softplus=True, impl=self.impl)
        return y.reshape(b, length, k, e)

    def walk_map(self, u: jax.Array, *, walks: Sequence[str], walk_index=None,
                 shift: bool = False, summed: bool = True, weights=None) -> jax.Array:
        """The K directions along K walks of a 2-D map, without permuting it
        (`selective_scan_2d`): direction k walks walks[k], or walks[walk_index[b, k]].

        The step size and B, C of each direction are projections of u at each map position,
        so they are computed in map layout, whatever order each direction visits the
        positions in: B, C (B, H, W, K, N) as slices of one matmul, the step size
        (K, B, H, W, E) walk-major as its K matmuls come out (no transpose).

        Args:
          u: (B, H, W, E) the map, read by every direction.
          walks, walk_index, shift, summed, weights: as `selective_scan_2d`.

        Returns:
          (B, H, W, E) summed over the directions (weighted), or (K, B, H, W, E).
        """
        b, h, w, e = u.shape
        if e != self.channels:
            raise ValueError(f"S6: map has shape {u.shape}, wanted (B, H, W, {self.channels})")
        dtype = self.dtype or u.dtype
        u = u.astype(dtype)
        x_dbl = jnp.einsum("bhwe,ker->bhwkr", u, self.x_proj[...].astype(dtype))
        r, n = self.dt_rank, self.state_dim
        dt, Bm, Cm = x_dbl[..., :r], x_dbl[..., r:r + n], x_dbl[..., r + n:]
        delta = jnp.einsum("bhwkr,kre->kbhwe", dt, self.dt_proj[...].astype(dtype))
        return selective_scan_2d(
            u, delta, self._A(), Bm, Cm, D=None if self.D is None else self.D[...],
            delta_bias=self.dt_bias[...], delta_softplus=True, walks=walks,
            walk_index=walk_index, shift=shift, summed=summed, weights=weights,
            impl=self.impl)
