"""Selective scans along the walks of a 2-D map (ViM2's cross-scan, ViQS's Switch of Scans),
behind one dispatcher.

Map layout, channels last:

    u, z  : (batch, H, W, E)        the map, read by every walk
    delta : (K, batch, H, W, E)     walk k's step size at each position
    B, C  : (batch, H, W, K, N)     walk k's input and output projections at each position
    A : (K, E, N)                   D, delta_bias : (K, E)

Walk k of sample b visits the H*W positions in the scan order `walks[k]` (fixed orders, as
the cross-scan), or `walks[walk_index[b, k]]` (orders chosen per sample, as Switch of Scans).
Along its order it is the selective scan of `mmx_jax.ssm.scan` with its own A, D and
delta_bias, reading u, z and its own delta, B, C at the positions it visits; its output goes
back to the position of its step, or with `shift` to that of the next step (QS's shift, the
paper's QSMixer: the first position gets 0 from the walk). The outputs come back summed
over the walks (weighted per sample and walk, if `weights`) or per walk.

Every per-walk array is in map layout, so a layer computes it from the map position by
position (delta, B and C are projections of u at each position: they do not depend on the
order the walk visits them in) and never permutes the map. Each comes in the layout its
projection produces: B and C slice the output of one matmul (batch, H, W, K * (R + 2N)), and
delta is K matmuls of rank R, which XLA lays out walk-major; a per-walk output is
(K, batch, H, W, E) like delta.

- "pallas": `kernels_pallas.selective_scan_walks`. The kernels compute the position of each
  step by index arithmetic and read and write the arrays where they lie.
- "sequential", "associative": the layout path. The map and the per-walk arrays are permuted
  into the walks' orders with the layout ops of `scan_orders` (reverses and transposes; gathers
  for per-sample walks), scanned by `selective_scan` with that implementation, and put back.
  This is the readable reference and the CPU path.
- "auto": "pallas" on GPU/TPU where the kernels handle the shape, else as `selective_scan`'s
  auto ("sequential" on CPU, "associative" on other GPU/TPU shapes).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mmx_jax.ssm.scan import IMPLS, Impl, compute_dtype, selective_scan
from mmx_jax.ssm.scan_orders import (
    ALL_ORDERS,
    apply_scans,
    scan_map,
    scan_orders,
    undo_scans,
    unscan_map,
)

log = logging.getLogger(__name__)


class WalkDims(NamedTuple):
    batch: int
    height: int
    width: int
    channels: int  # E
    walks: int  # K, the walk slots
    state: int  # N


def _shape_error(name: str, got, wanted: str) -> ValueError:
    return ValueError(f"selective_scan_2d: argument {name!r} has shape {tuple(got)}, "
                      f"wanted {wanted}")


def check_walk_args(u, delta, A, B, C, D=None, z=None, delta_bias=None, *,
                    walks: Sequence[str], walk_index=None, weights=None) -> WalkDims:
    """Validates shapes, dtypes and walk names; returns the `WalkDims`. A ValueError names the
    argument."""
    for name, x in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D),
                    ("z", z), ("delta_bias", delta_bias), ("weights", weights)):
        if x is not None and not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise ValueError(f"selective_scan_2d: argument {name!r} has dtype "
                             f"{jnp.result_type(x)}, wanted a floating dtype")
    for name in walks:
        if name not in ALL_ORDERS:
            raise ValueError(f"selective_scan_2d: walk {name!r} is not one of {ALL_ORDERS}")
    if jnp.ndim(u) != 4:
        raise _shape_error("u", jnp.shape(u), "(batch, H, W, E)")
    b, h, w, e = jnp.shape(u)
    if walk_index is None:
        k = len(walks)
    else:
        if not jnp.issubdtype(jnp.result_type(walk_index), jnp.integer):
            raise ValueError(f"selective_scan_2d: argument 'walk_index' has dtype "
                             f"{jnp.result_type(walk_index)}, wanted an integer dtype")
        if jnp.ndim(walk_index) != 2 or jnp.shape(walk_index)[0] != b:
            raise _shape_error("walk_index", jnp.shape(walk_index), f"({b}, K)")
        k = jnp.shape(walk_index)[1]
    if k < 1:
        raise ValueError("selective_scan_2d: no walks (walks is empty, or walk_index has no "
                         "slots)")
    if jnp.shape(delta) != (k, b, h, w, e):
        raise _shape_error("delta", jnp.shape(delta), f"{(k, b, h, w, e)} (K = {k} walks)")
    if jnp.ndim(A) != 3 or jnp.shape(A)[:2] != (k, e):
        raise _shape_error("A", jnp.shape(A), f"({k}, {e}, N)")
    n = jnp.shape(A)[2]
    for name, x in (("B", B), ("C", C)):
        if jnp.shape(x) != (b, h, w, k, n):
            raise _shape_error(name, jnp.shape(x), str((b, h, w, k, n)))
    for name, x in (("D", D), ("delta_bias", delta_bias)):
        if x is not None and jnp.shape(x) != (k, e):
            raise _shape_error(name, jnp.shape(x), str((k, e)))
    if z is not None and jnp.shape(z) != (b, h, w, e):
        raise _shape_error("z", jnp.shape(z), f"{(b, h, w, e)} (same as u)")
    if weights is not None and jnp.shape(weights) != (b, k):
        raise _shape_error("weights", jnp.shape(weights), str((b, k)))
    return WalkDims(b, h, w, e, k, n)


# ---------------------------------------------------------------------------------------------
# The layout path: permute into the walks' orders, scan in 1-D, permute back.


class _Layout:
    """The permutations of one call: fixed walks through `scan_map`/`unscan_map` (reverses and
    transposes), per-sample walks through gathers."""

    def __init__(self, walks: Sequence[str], walk_index, height: int, width: int):
        self.walks, self.height, self.width = tuple(walks), height, width
        self.perms = None
        if walk_index is not None:
            self.perms = jnp.asarray(scan_orders(self.walks, height, width))[walk_index]

    def shared(self, x):
        """(b, H, W, F) read by every walk -> (b, L, K, F) in each walk's order."""
        if self.perms is None:
            return scan_map(x, self.walks)
        b, h, w, f = x.shape
        return apply_scans(x.reshape(b, h * w, f), self.perms)

    def per_walk(self, x):
        """(b, H, W, K, F), walk k's own -> (b, L, K, F) in each walk's order (delta comes
        walk-major, (K, b, H, W, F): moved first)."""
        if self.perms is None:
            return jnp.concatenate([scan_map(x[:, :, :, i], (name,))
                                    for i, name in enumerate(self.walks)], axis=2)
        b, h, w, k, f = x.shape
        index = jnp.swapaxes(self.perms, 1, 2)[..., None]  # (b, L, K, 1)
        return jnp.take_along_axis(x.reshape(b, h * w, k, f), index, axis=1)

    def back(self, y):
        """(b, L, K, E) in each walk's order -> (b, L, K, E) at the map positions."""
        if self.perms is None:
            return unscan_map(y, self.walks, self.height, self.width)
        return undo_scans(y, self.perms)


def _scan_2d_layout(u, delta, A, B, C, D, z, delta_bias, delta_softplus, *, walks, walk_index,
                    shift, summed, weights, impl, dims: WalkDims):
    b, h, w, e, k, n = dims
    length = h * w
    layout = _Layout(walks, walk_index, h, w)
    flat = lambda x: None if x is None else x.reshape(k * e)  # noqa: E731
    y = selective_scan(
        layout.shared(u).reshape(b, length, k * e), layout.per_walk(
            jnp.moveaxis(delta, 0, 3)).reshape(b, length, k * e), A.reshape(k * e, n),
        layout.per_walk(B), layout.per_walk(C),
        D=flat(D), z=None if z is None else layout.shared(z).reshape(b, length, k * e),
        delta_bias=flat(delta_bias), delta_softplus=delta_softplus, impl=impl)
    y = y.reshape(b, length, k, e)
    if shift:  # each walk's output one step later in its own order; its first step gets 0
        y = jnp.pad(y[:, :-1], ((0, 0), (1, 0), (0, 0), (0, 0)))
    y = layout.back(y).reshape(b, h, w, k, e)
    if not summed:
        return jnp.moveaxis(y, 3, 0)
    f32 = compute_dtype(u, delta, A, B, C, D, z, delta_bias, weights)
    if weights is None:
        return y.astype(f32).sum(axis=3).astype(u.dtype)
    return jnp.einsum("bhwke,bk->bhwe", y.astype(f32), weights.astype(f32)).astype(u.dtype)


def _scan_2d_pallas(u, delta, A, B, C, D, z, delta_bias, delta_softplus, *, walks, walk_index,
                    shift, summed, weights):
    import kernels_pallas  # noqa: PLC0415  (kept lazy: the kernels are optional at import)

    codes = jnp.asarray(np.array([kernels_pallas.walk_code(name) for name in walks], np.int32))
    codes = codes[None] if walk_index is None else codes[walk_index]
    return kernels_pallas.selective_scan_walks(
        u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
        walk_codes=codes, shift=shift, summed=summed, weights=weights)


def resolve_impl_2d(impl: str, dims: WalkDims | None = None) -> str:
    """Turns "auto" into a concrete implementation for the default backend and this shape."""
    if impl not in IMPLS:
        raise ValueError(f"selective_scan_2d: impl={impl!r} is not one of {IMPLS}")
    if impl != "auto":
        return impl
    platform = jax.default_backend()
    if platform not in ("gpu", "cuda", "rocm", "tpu"):
        return "sequential"  # as selective_scan: the step loop is the faster CPU scan
    import kernels_pallas  # noqa: PLC0415  (lazy: Pallas loads only where it runs)

    reason = kernels_pallas.unsupported_walks_reason(platform, **dims._asdict()) if dims else None
    if reason:
        log.info("selective_scan_2d: auto falls back to 'associative': %s", reason)
        return "associative"
    return "pallas"


def selective_scan_2d(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      *, walks: Sequence[str], walk_index=None, shift: bool = False,
                      summed: bool = True, weights=None, impl: Impl = "auto"):
    """Selective scans along K walks of a 2-D map: see the module docstring.

    Args:
      u: (batch, H, W, E) the map.  z: optional (batch, H, W, E) gate: each walk's output
        *= silu(z) at its step's own position (before any shift).
      delta: (K, batch, H, W, E).  A: (K, E, N).  B, C: (batch, H, W, K, N).
      D, delta_bias: optional (K, E).  delta_softplus: delta <- softplus(delta + delta_bias).
      walks: scan order names (`scan_orders.ALL_ORDERS`): slot k's walk when walk_index is
        None (K = len(walks)), else the bank that walk_index picks from.
      walk_index: optional int (batch, K): slot k of sample b walks walks[walk_index[b, k]].
      shift: every walk's output moves one step later along its walk (QSMixer).
      summed: return the sum over walks, else each walk's output.
      weights: optional (batch, K): the sum weighs slot k of sample b by weights[b, k]
        (summed only).
      impl: "pallas", "sequential", "associative" or "auto".

    Returns:
      (batch, H, W, E) if summed, else (K, batch, H, W, E), in u's dtype.
    """
    dims = check_walk_args(u, delta, A, B, C, D, z, delta_bias, walks=walks,
                           walk_index=walk_index, weights=weights)
    if weights is not None and not summed:
        raise ValueError("selective_scan_2d: weights weigh the sum over walks, so they need "
                         "summed=True")
    kwargs = dict(walks=tuple(walks), walk_index=walk_index, shift=bool(shift),
                  summed=bool(summed), weights=weights)
    match resolve_impl_2d(impl, dims):
        case "pallas":
            return _scan_2d_pallas(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                   **kwargs)
        case "sequential" | "sequential_vjp" | "associative" as layout_impl:
            return _scan_2d_layout(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                   impl=layout_impl, dims=dims, **kwargs)
