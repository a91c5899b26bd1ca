"""Selective token and channel mixers (the paper's selective token and channel mixers, and QSMixer).

Every mixer has the same skeleton, `_GatedSelectiveMixer`:

    u = silu(conv(Linear_in(x)))      gate = silu(Linear_gate(x))
    y = Linear_out(gate * mix(u))

and differs in `mix`: the scan directions it runs (all of them in one `selective_scan` call)
and the convolution in front of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mmx_jax.layers.conv import DepthwiseConv2D
from mmx_jax.layers.initializers import uniform
from mmx_jax.layers.linear import Linear
from mmx_jax.layers.s6 import S6
from mmx_jax.ssm.scan_orders import CROSS_SCAN, scan_map, unscan_map


def causal_depthwise_conv1d(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """Causal depthwise 1-D convolution.

    Args:
      x: (B, L, C).  kernel: (W, C), kernel[-1] weighs the current step.  bias: (C,).

    Returns:
      (B, L, C) with out[t] = sum_j kernel[j] * x[t - (W - 1) + j] + bias (zeros before t=0).
    """
    width = kernel.shape[0]
    padded = jnp.pad(x, ((0, 0), (width - 1, 0), (0, 0)))
    length = x.shape[1]
    out = sum(padded[:, j:j + length] * kernel[j] for j in range(width))
    return out + bias


def shift_right(y: jax.Array, axis: int = 1) -> jax.Array:
    """Moves every step one later along `axis`; the first step becomes 0."""
    y = jnp.moveaxis(y, axis, 0)
    y = jnp.concatenate([jnp.zeros_like(y[:1]), y[:-1]], axis=0)
    return jnp.moveaxis(y, 0, axis)


#: How the mixers run scans along several orders: "walks" (`S6.walk_map`: `selective_scan_2d`
#: reading the map in place) or "permuted" (the map permuted into each scan order, the 1-D
#: scan, and back).
SCAN_LAYOUTS = ("walks", "permuted")


def check_scan_layout(owner: str, scan_layout: str) -> str:
    if scan_layout not in SCAN_LAYOUTS:
        raise ValueError(f"{owner}: scan_layout={scan_layout!r}, wanted one of {SCAN_LAYOUTS}")
    return scan_layout


class _GatedSelectiveMixer(nnx.Module):
    """In/gate/out projections shared by every selective mixer. Subclasses define `mix`."""

    def __init__(self, dim: int, *, expand: int = 2, dtype=None, rngs: nnx.Rngs):
        self.dim, self.inner = dim, expand * dim
        self.dtype = dtype
        self.in_proj = Linear(dim, self.inner, dtype=dtype, rngs=rngs)
        self.gate_proj = Linear(dim, self.inner, dtype=dtype, rngs=rngs)
        self.out_proj = Linear(self.inner, dim, dtype=dtype, rngs=rngs)

    def mix(self, u: jax.Array) -> jax.Array:
        raise NotImplementedError

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = jax.nn.silu(self.gate_proj(x))
        return self.out_proj(gate * self.mix(self.in_proj(x)))


class SelectiveTokenMixer(_GatedSelectiveMixer):
    """Selective mixing along the sequence axis of (..., L, D) inputs (1-D data).

    Args:
      dim: D.  expand: E = expand * D.  state_dim: N.
      directions: 1 (causal, forward) or 2 (forward and flipped), each with its own causal
        depthwise conv and S6 parameters; or "quasi_separable" (QSMixer): one shared
        conv, forward and backward S6 sharing A and one D skip, outputs shifted one step so
        that the diagonal is D alone: QS(u) = shift(SS_f(u)) + flip(shift(SS_b(flip(u)))) + D*u.
      conv_width: width of the causal depthwise conv.
      impl: selective_scan implementation.
      scan_layout: for "quasi_separable" (`SCAN_LAYOUTS`): "walks" runs the two directions as
        the forward and reversed walks of a 1 x L map with QS's shift (`S6.walk_map`), reading
        the sequence in place; "permuted" stacks it with its flipped copy and shifts and flips
        the outputs. The same result. (The other directions keep their flips: each reads its
        own conv's output, and the walks share one input.)
    """

    def __init__(self, dim: int, *, expand: int = 2, state_dim: int = 16,
                 directions: int | str = 1, conv_width: int = 4, dt_rank: int | str = "auto",
                 impl: str = "auto", scan_layout: str = "walks", dtype=None, rngs: nnx.Rngs):
        super().__init__(dim, expand=expand, dtype=dtype, rngs=rngs)
        if directions not in (1, 2, "quasi_separable"):
            raise ValueError(f"SelectiveTokenMixer: directions={directions!r}, wanted 1, 2 or "
                             "'quasi_separable'")
        self.scan_layout = check_scan_layout(type(self).__name__, scan_layout)
        self.quasi_separable = directions == "quasi_separable"
        k = 2 if self.quasi_separable else directions
        convs = 1 if self.quasi_separable else k
        self.num_directions = k
        self.conv_kernel = nnx.Param(
            uniform(rngs.params(), (conv_width, convs * self.inner), minval=-1,
                    maxval=1) / conv_width ** 0.5)
        self.conv_bias = nnx.Param(jnp.zeros((convs * self.inner,)))
        self.s6 = S6(self.inner, num_directions=k, state_dim=state_dim, dt_rank=dt_rank,
                     model_dim=dim, directions_per_A=2 if self.quasi_separable else 1,
                     use_D=not self.quasi_separable, impl=impl, dtype=dtype, rngs=rngs)
        self.D = nnx.Param(jnp.ones((self.inner,))) if self.quasi_separable else None

    def _conv(self, u):
        dtype = u.dtype
        return jax.nn.silu(causal_depthwise_conv1d(u, self.conv_kernel[...].astype(dtype),
                                                   self.conv_bias[...].astype(dtype)))

    def mix(self, u: jax.Array) -> jax.Array:
        lead, (length, e) = u.shape[:-2], u.shape[-2:]
        u = u.reshape(-1, length, e)
        if self.quasi_separable and self.scan_layout == "walks":
            u = self._conv(u)
            y = self.s6.walk_map(u[:, None], walks=("row", "row_rev"), shift=True)[:, 0]
            y = y + self.D[...].astype(y.dtype) * u
        elif self.quasi_separable:
            u = self._conv(u)
            y = self.s6(jnp.stack([u, jnp.flip(u, 1)], axis=2))
            y = shift_right(y[:, :, 0]) + jnp.flip(shift_right(y[:, :, 1]), 1)
            y = y + self.D[...].astype(y.dtype) * u
        elif self.num_directions == 1:
            y = self.s6(self._conv(u)[:, :, None])[:, :, 0]
        else:
            seqs = jnp.concatenate([u, jnp.flip(u, 1)], axis=-1)  # each direction its own conv
            y = self.s6(self._conv(seqs).reshape(-1, length, 2, e))
            y = y[:, :, 0] + jnp.flip(y[:, :, 1], 1)
        return y.reshape(*lead, length, e)


class CrossScanTokenMixer(_GatedSelectiveMixer):
    """Selective mixing of a 2-D map (B, H, W, D) along several scan orders (ViM2's cross-scan).

    A depthwise 3x3 conv on the map, then the K scans (default: VMamba's cross-scan: row-major,
    column-major and both reversed) each with their own S6 parameters, in one scan call; the
    outputs are put back in row-major order and summed. `scan_layout` (`SCAN_LAYOUTS`) picks
    how: the walks read in place ("walks", the default) or a permuted copy per scan
    ("permuted"); both compute the same.
    """

    def __init__(self, dim: int, *, expand: int = 2, state_dim: int = 16,
                 scans: Sequence[str] = CROSS_SCAN, conv_size: int = 3,
                 dt_rank: int | str = "auto", impl: str = "auto", scan_layout: str = "walks",
                 dtype=None, rngs: nnx.Rngs):
        super().__init__(dim, expand=expand, dtype=dtype, rngs=rngs)
        self.scans = tuple(scans)
        self.scan_layout = check_scan_layout(type(self).__name__, scan_layout)
        self.conv = DepthwiseConv2D(self.inner, (conv_size, conv_size), dtype=dtype, rngs=rngs)
        self.s6 = S6(self.inner, num_directions=len(self.scans), state_dim=state_dim,
                     dt_rank=dt_rank, model_dim=dim, impl=impl, dtype=dtype, rngs=rngs)

    def mix(self, u: jax.Array) -> jax.Array:
        b, h, w, e = u.shape
        u = jax.nn.silu(self.conv(u))
        if self.scan_layout == "walks":
            return self.s6.walk_map(u, walks=self.scans)
        y = unscan_map(self.s6(scan_map(u, self.scans)), self.scans, h, w)
        return y.sum(axis=2).reshape(b, h, w, e)


class SelectiveChannelMixer(nnx.Module):
    """Bidirectional selective mixing along a chosen axis (the paper's selective channel mixer).

    Channels have no causal order, so the mixer always scans both ways (or quasi-separably).
    For time series the tensor is (B, M, P, d) and the scan runs along the variates M (axis 1)
    for every (batch, patch), with d features.
    """

    def __init__(self, features: int, *, axis: int = -2, expand: int = 2, state_dim: int = 16,
                 quasi_separable: bool = False, conv_width: int = 4,
                 dt_rank: int | str = "auto", impl: str = "auto", scan_layout: str = "walks",
                 dtype=None, rngs: nnx.Rngs):
        self.axis = axis
        self.mixer = SelectiveTokenMixer(
            features, expand=expand, state_dim=state_dim,
            directions="quasi_separable" if quasi_separable else 2, conv_width=conv_width,
            dt_rank=dt_rank, impl=impl, scan_layout=scan_layout, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (..., S, ..., features) with the scanned axis S at `self.axis` -> same shape."""
        x = jnp.moveaxis(x, self.axis, -2)
        return jnp.moveaxis(self.mixer(x), -2, self.axis)


class ChannelGroupMixer(nnx.Module):
    """The image channel mixer: the paper's selective channel mixer over channel groups (our
    choice).

    x (B, L, C) -> Linear C -> 2C -> (B*L, G, F) with F = group_size, G = 2C / F ->
    bidirectional selective mixing along G with F features -> Linear 2C -> C.
    """

    def __init__(self, channels: int, *, group_size: int = 16, expand: int = 2,
                 state_dim: int = 16, quasi_separable: bool = False, conv_width: int = 4,
                 impl: str = "auto", scan_layout: str = "walks", dtype=None, rngs: nnx.Rngs):
        width = 2 * channels
        if width % group_size:
            raise ValueError(f"ChannelGroupMixer: 2 * channels = {width} is not divisible by "
                             f"group_size = {group_size}")
        self.group_size = group_size
        self.up = Linear(channels, width, dtype=dtype, rngs=rngs)
        self.groups = SelectiveChannelMixer(
            group_size, axis=-2, expand=expand, state_dim=state_dim,
            quasi_separable=quasi_separable, conv_width=conv_width, impl=impl,
            scan_layout=scan_layout, dtype=dtype, rngs=rngs)
        self.down = Linear(width, channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (..., C) -> (..., C)."""
        h = self.up(x)
        g = h.reshape(*h.shape[:-1], -1, self.group_size)
        return self.down(self.groups(g).reshape(h.shape))
