"""Switch of Scans (SoS): a token mixer for 2-D maps that picks its scan orders per sample
(our design, from the paper's later versions).

    logits = Linear(concat_d(pool(h_d)))      h_d = silu(dwconv_dilation_d(h_{d-1})), h_0 = x
    top-k scans by logit fill k slots (slot 0 the highest), each slot with its own S6
    y = Linear_out( silu(Linear_gate(x)) * sum_j softmax(top-k logits)_j * slot_j(u) )
    u = silu(dwconv3x3(Linear_in(x)))

The gate is a stack of depthwise convolutions at growing dilations (multi-resolution), each
level pooled over the map; the chosen logits weigh the slot outputs through a softmax, so the
gate receives gradients even though the choice itself is discrete. The chosen orders are
per-sample permutations gathered from a fixed bank, so every shape is static and everything
jits.

How quasi-separable S6 (QS) and SoS combine (`quasi_separable`):

- True (ViQS's default): every slot runs a QS scan along its order,
  QS_j(u) = shift(SS_f,j(u)) + flip(shift(SS_b,j(flip(u)))) + D_j * u in slot j's order,
  forward and backward directions sharing A_j (and the conv and projections of the mixer),
  differing in x_proj/dt_proj/dt_bias. Each slot is then non-causal on its own, so a scan and
  its reverse in the bank differ only in which of the slot's two parameter sets reads which
  way. Cost: 2k scan directions of length H*W (8 for k = 4), all in ONE `selective_scan`
  call, against the 4 of ViM2's cross-scan: about twice the scan work and twice the
  x_proj/dt_proj work, for k per-sample orders chosen from 8.
- False: every slot is one causal S6 direction along its order (k directions, the same scan
  cost as the cross-scan for k = 4); QS is then used only by the channel mixer.

Either way the gate costs len(dilations) depthwise convolutions on the D-channel input (a few
percent of the in/out projections), and undoing the per-sample orders sorts (B, slots, H*W)
integer indices.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mmx_jax.layers.conv import DepthwiseConv2D
from mmx_jax.layers.mixers import _GatedSelectiveMixer, check_scan_layout, shift_right
from mmx_jax.layers.s6 import S6
from mmx_jax.ssm.scan_orders import (
    ALL_ORDERS,
    apply_scans,
    reversed_walk,
    scan_orders,
    undo_scans,
)


class ScanGate(nnx.Module):
    """Multi-resolution gate: (B, H, W, D) -> one logit per candidate scan (B, S), float32.

    A stack of depthwise `kernel_size` convolutions at the given dilations (each applied to the
    previous level, with silu), every level averaged over the map, concatenated, and a Linear
    to `num_scans` logits.
    """

    def __init__(self, dim: int, num_scans: int, *, kernel_size: int = 3,
                 dilations: Sequence[int] = (1, 2, 4), dtype=None, rngs: nnx.Rngs):
        if not dilations:
            raise ValueError("ScanGate: dilations is empty, wanted at least one dilation")
        self.convs = nnx.List([
            DepthwiseConv2D(dim, (kernel_size, kernel_size), dilation=(d, d), dtype=dtype,
                            rngs=rngs)
            for d in dilations])
        self.proj = nnx.Linear(len(dilations) * dim, num_scans, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h, pooled = x, []
        for conv in self.convs:
            h = jax.nn.silu(conv(h))
            pooled.append(h.mean(axis=(1, 2)))
        return self.proj(jnp.concatenate(pooled, axis=-1)).astype(jnp.float32)


class SwitchOfScansTokenMixer(_GatedSelectiveMixer):
    """Selective mixing of a 2-D map (B, H, W, D) along k scan orders chosen per sample.

    Args:
      dim: D.  expand: E = expand * D.  state_dim: N.  dt_rank: S6 step-size rank.
      scans: the bank of candidate orders (`scans.ALL_ORDERS`: 8).
      top_k: k, the number of slots (orders used per sample).
      quasi_separable: each slot a QS scan (True) or one causal direction (False); see the
        module docstring for the cost of each.
      conv_size: the depthwise conv on the inner map.
      gate_kernel_size, gate_dilations: the gate's depthwise convolution stack.
      impl: selective_scan implementation.
      scan_layout: "walks" (`S6.walk_map`: each sample's chosen walks read the map in place,
        the slots summed with their weights in the same call) or "permuted" (each sample's
        orders gathered into copies, the 1-D scan, and scattered back); both compute the same.
      dtype: compute dtype.
    """

    def __init__(self, dim: int, *, expand: int = 2, state_dim: int = 16,
                 scans: Sequence[str] = ALL_ORDERS, top_k: int = 4,
                 quasi_separable: bool = True, conv_size: int = 3, gate_kernel_size: int = 3,
                 gate_dilations: Sequence[int] = (1, 2, 4), dt_rank: int | str = "auto",
                 impl: str = "auto", scan_layout: str = "walks", dtype=None, rngs: nnx.Rngs):
        super().__init__(dim, expand=expand, dtype=dtype, rngs=rngs)
        self.scans = tuple(scans)
        self.scan_layout = check_scan_layout(type(self).__name__, scan_layout)
        if not 1 <= top_k <= len(self.scans):
            raise ValueError(f"SwitchOfScansTokenMixer: top_k={top_k}, wanted 1 to "
                             f"{len(self.scans)} (the number of scans)")
        scan_orders(self.scans, 1, 1)  # rejects unknown names now rather than at first call
        self.top_k, self.quasi_separable = top_k, quasi_separable
        self.conv = DepthwiseConv2D(self.inner, (conv_size, conv_size), dtype=dtype, rngs=rngs)
        self.scan_gate = ScanGate(dim, len(self.scans), kernel_size=gate_kernel_size,
                             dilations=gate_dilations, dtype=dtype, rngs=rngs)
        s6_args = dict(state_dim=state_dim, dt_rank=dt_rank, model_dim=dim, impl=impl,
                       dtype=dtype, rngs=rngs)
        if quasi_separable:
            self.s6 = S6(self.inner, num_directions=2 * top_k, directions_per_A=2, use_D=False,
                         **s6_args)
            self.D = nnx.Param(jnp.ones((top_k, self.inner)))
        else:
            self.s6 = S6(self.inner, num_directions=top_k, **s6_args)
            self.D = None

    def select(self, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
        """logits (B, S) -> the chosen scans (B, k) int, highest first, and their weights
        (B, k): the softmax of the chosen logits."""
        values, indices = jax.lax.top_k(logits, self.top_k)
        return indices, jax.nn.softmax(values, axis=-1)

    def slot_orders(self, indices: jax.Array, height: int, width: int) -> jax.Array:
        """indices (B, k) into the bank -> per-sample permutations (B, k, H*W)."""
        return jnp.asarray(scan_orders(self.scans, height, width))[indices]

    def mix(self, u: jax.Array, indices: jax.Array, weights: jax.Array) -> jax.Array:
        """u: (B, H, W, E) after Linear_in; indices, weights: (B, k) from `select`
        -> (B, H, W, E), the weighted sum of the slot outputs in row-major order."""
        b, h, w, e = u.shape
        u = jax.nn.silu(self.conv(u))
        if self.scan_layout == "walks":
            return self._mix_walks(u, indices, weights)
        u = u.reshape(b, h * w, e)
        perms = self.slot_orders(indices, h, w)  # (B, k, L)
        if self.quasi_separable:
            # Directions [f_0, b_0, f_1, b_1, ...]: the backward one reads its slot reversed.
            perms = jnp.stack([perms, jnp.flip(perms, -1)], axis=2).reshape(b, -1, h * w)
            y = shift_right(self.s6(apply_scans(u, perms)), axis=1)
            y = undo_scans(y, perms).reshape(b, h * w, self.top_k, 2, e).sum(axis=3)
            y = y + self.D[...].astype(y.dtype) * u[:, :, None]
        else:
            y = undo_scans(self.s6(apply_scans(u, perms)), perms)
        y = (y * weights.astype(y.dtype)[:, None, :, None]).sum(axis=2)
        return y.reshape(b, h, w, e)

    def _mix_walks(self, u: jax.Array, indices: jax.Array, weights: jax.Array) -> jax.Array:
        """`mix` with the slots' walks reading the (B, H, W, E) map in place."""
        if not self.quasi_separable:
            return self.s6.walk_map(u, walks=self.scans, walk_index=indices, weights=weights)
        # Directions [f_0, b_0, f_1, b_1, ...]: the backward one walks its slot's order
        # reversed, which is the bank's entry S places further in the doubled bank.
        bank = self.scans + tuple(reversed_walk(name) for name in self.scans)
        walk_index = jnp.stack([indices, indices + len(self.scans)], axis=2)
        y = self.s6.walk_map(u, walks=bank, walk_index=walk_index.reshape(u.shape[0], -1),
                             shift=True, weights=jnp.repeat(weights, 2, axis=1))
        f32 = jnp.promote_types(jnp.float32, u.dtype)
        skip = weights.astype(f32) @ self.D[...].astype(f32)  # sum_j w_j D_j, (B, E)
        return y + skip.astype(y.dtype)[:, None, None, :] * u

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, D) -> (B, H, W, D)."""
        indices, weights = self.select(self.scan_gate(x))
        gate = jax.nn.silu(self.gate_proj(x))
        return self.out_proj(gate * self.mix(self.in_proj(x), indices, weights))
