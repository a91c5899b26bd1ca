"""All implementations of the selective scan (S6), behind one dispatcher.

Channels-last layout (SPEC section 1):

    u, delta : (batch, length, E)     A : (E, N), negative
    B, C     : (batch, length, N) or (batch, length, G, N), E divisible by G
    D, delta_bias : (E,)              z : (batch, length, E)      h0 : (batch, E, N)

    delta  <- softplus(delta + delta_bias)             (when delta_softplus)
    h_t     = exp(delta_t * A) * h_{t-1} + (delta_t * u_t)[:, None] * B_t[group]
    y_t     = h_t @ C_t[group] + D * u_t ;   y_t *= silu(z_t)   (when z is given)

Every implementation is a pure function with the same signature; `selective_scan` checks the
arguments once, resolves ``impl="auto"`` and dispatches with a ``match``. All compute in float32
(float64 when an input is float64) and return ``y`` in the dtype of ``u``; the final state
stays in the compute dtype.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

Impl = Literal["auto", "sequential", "associative", "pallas"]
IMPLS: tuple[str, ...] = ("auto", "sequential", "associative", "pallas")
DEFAULT_CHUNK = 128

log = logging.getLogger(__name__)


class ScanDims(NamedTuple):
    batch: int
    length: int
    channels: int  # E
    state: int  # N
    groups: int  # G (1 when B/C have no group axis)


def _shape_error(name: str, got, wanted: str) -> ValueError:
    return ValueError(f"selective_scan: argument {name!r} has shape {tuple(got)}, wanted {wanted}")


def check_scan_args(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None):
    """Validates shapes and dtypes, returns the `ScanDims`; ValueError names the argument."""
    for name, x in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("delta_bias", delta_bias), ("initial_state", initial_state)):
        if x is not None and not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise ValueError(f"selective_scan: argument {name!r} has dtype "
                             f"{jnp.result_type(x)}, wanted a floating dtype")
    if jnp.ndim(u) != 3:
        raise _shape_error("u", jnp.shape(u), "(batch, length, E)")
    b, length, e = jnp.shape(u)
    if length < 1:
        raise _shape_error("u", jnp.shape(u), "(batch, length, E) with length >= 1")
    if jnp.shape(delta) != (b, length, e):
        raise _shape_error("delta", jnp.shape(delta), f"{(b, length, e)} (same as u)")
    if jnp.ndim(A) != 2 or jnp.shape(A)[0] != e:
        raise _shape_error("A", jnp.shape(A), f"({e}, N)")
    n = jnp.shape(A)[1]
    if jnp.ndim(B) == 3:
        groups = 1
        wanted_bc = (b, length, n)
    elif jnp.ndim(B) == 4:
        groups = jnp.shape(B)[2]
        if groups < 1 or e % groups:
            raise _shape_error("B", jnp.shape(B),
                               f"({b}, {length}, G, {n}) with E={e} divisible by G")
        wanted_bc = (b, length, groups, n)
    else:
        raise _shape_error("B", jnp.shape(B), f"({b}, {length}, {n}) or ({b}, {length}, G, {n})")
    if jnp.shape(B) != wanted_bc:
        raise _shape_error("B", jnp.shape(B), str(wanted_bc))
    if jnp.shape(C) != wanted_bc:
        raise _shape_error("C", jnp.shape(C), f"{wanted_bc} (same as B)")
    for name, x in (("D", D), ("delta_bias", delta_bias)):
        if x is not None and jnp.shape(x) != (e,):
            raise _shape_error(name, jnp.shape(x), f"({e},)")
    if z is not None and jnp.shape(z) != (b, length, e):
        raise _shape_error("z", jnp.shape(z), f"{(b, length, e)} (same as u)")
    if initial_state is not None and jnp.shape(initial_state) != (b, e, n):
        raise _shape_error("initial_state", jnp.shape(initial_state), f"({b}, {e}, {n})")
    return ScanDims(b, length, e, n, groups)


def compute_dtype(*arrays) -> jnp.dtype:
    """float32, or float64 when an input is float64 (gradient checks under x64)."""
    return jnp.result_type(jnp.float32, *(x for x in arrays if x is not None))


# ---------------------------------------------------------------------------------------------
# Shared pre- and post-processing of the reference implementations.


class _Prepared(NamedTuple):
    """Inputs in the compute dtype, time-reversed when scanning backwards, E split into (G, E/G)."""

    u: jax.Array  # (b, L, G, E/G)
    delta: jax.Array  # (b, L, G, E/G), softplus applied
    A: jax.Array  # (G, E/G, N)
    B: jax.Array  # (b, L, G, N)
    C: jax.Array  # (b, L, G, N)
    h0: jax.Array  # (b, G, E/G, N)


def _prepare(u, delta, A, B, C, delta_bias, delta_softplus, reverse, initial_state, dims):
    b, length, e, n, g = dims
    f32 = compute_dtype(u, delta, A, B, C, delta_bias, initial_state)
    delta = delta.astype(f32)
    if delta_bias is not None:
        delta = delta + delta_bias.astype(f32)
    if delta_softplus:
        delta = jax.nn.softplus(delta)
    B = B.astype(f32).reshape(b, length, g, n)
    C = C.astype(f32).reshape(b, length, g, n)
    u = u.astype(f32)
    if reverse:
        u, delta, B, C = (jnp.flip(x, axis=1) for x in (u, delta, B, C))
    h0 = (jnp.zeros((b, e, n), f32) if initial_state is None else initial_state.astype(f32))
    split = (b, length, g, e // g)
    return _Prepared(u.reshape(split), delta.reshape(split), A.astype(f32).reshape(g, e // g, n),
                     B, C, h0.reshape(b, g, e // g, n))


def _finish(y, h_last, u, D, z, reverse, return_final_state, dims):
    """y: (b, L, G, E/G) in scan order -> output in u's dtype, original time order."""
    b, length, e, n, _ = dims
    f32 = y.dtype
    y = y.reshape(b, length, e)
    if reverse:
        y = jnp.flip(y, axis=1)
    if D is not None:
        y = y + D.astype(f32) * u.astype(f32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(f32))
    y = y.astype(u.dtype)
    if return_final_state:
        return y, h_last.reshape(b, e, n)
    return y


def _reference_impl(core: Callable) -> Callable:
    """Turns a recurrence `core(prepared) -> (y, h_last)` into a full scan implementation."""

    @functools.wraps(core)
    def impl(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
             reverse=False, initial_state=None, return_final_state=False, **core_kwargs):
        dims = check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
        p = _prepare(u, delta, A, B, C, delta_bias, delta_softplus, reverse, initial_state, dims)
        y, h_last = core(p, **core_kwargs)
        return _finish(y, h_last, u, D, z, reverse, return_final_state, dims)

    return impl


# ---------------------------------------------------------------------------------------------
# Implementations.


@_reference_impl
def selective_scan_sequential(p: _Prepared):
    """One step at a time with `lax.scan`: the readable reference."""

    def step(h, xs):
        u_t, dt_t, b_t, c_t = xs  # (b, G, E/G), (b, G, E/G), (b, G, N), (b, G, N)
        h = jnp.exp(dt_t[..., None] * p.A) * h + (dt_t * u_t)[..., None] * b_t[:, :, None, :]
        return h, (h * c_t[:, :, None, :]).sum(-1)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (p.u, p.delta, p.B, p.C))
    h_last, y = jax.lax.scan(step, p.h0, xs)
    return jnp.moveaxis(y, 0, 1), h_last


def _combine(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_r * a_l, a_r * b_l + b_r


@_reference_impl
def selective_scan_associative(p: _Prepared, chunk_size: int = DEFAULT_CHUNK):
    """`lax.associative_scan` over chunks of `chunk_size` steps, chunks chained by `lax.scan`.

    Only one chunk's (batch, chunk, E, N) decays and inputs exist at a time, and each chunk is
    rematerialised in the backward pass, so peak memory grows with the chunk, not the length.
    """
    b, length, g, eg = p.u.shape
    chunk = max(1, min(chunk_size, length))
    pad = -length % chunk
    # Padding steps have delta = 0: decay 1 and no input, so the carried state passes unchanged.
    u, delta, B, C = (jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
                      for x in (p.u, p.delta, p.B, p.C))
    n_chunks = (length + pad) // chunk

    def to_chunks(x):
        return jnp.moveaxis(x.reshape(b, n_chunks, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk_step(h, xs):
        u_c, dt_c, b_c, c_c = xs  # (b, T, G, E/G), ..., (b, T, G, N)
        decay = jnp.exp(dt_c[..., None] * p.A)  # (b, T, G, E/G, N)
        inp = (dt_c * u_c)[..., None] * b_c[:, :, :, None, :]
        a_cum, b_cum = jax.lax.associative_scan(_combine, (decay, inp), axis=1)
        h_all = a_cum * h[:, None] + b_cum
        return h_all[:, -1], (h_all * c_c[:, :, :, None, :]).sum(-1)

    h_last, y = jax.lax.scan(chunk_step, p.h0, tuple(map(to_chunks, (u, delta, B, C))))
    y = jnp.moveaxis(y, 0, 1).reshape(b, n_chunks * chunk, g, eg)[:, :length]
    return y, h_last


def selective_scan_pallas(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                          delta_softplus=False, reverse=False, initial_state=None,
                          return_final_state=False):
    """The fused Pallas kernels of `kernels_pallas` (interpret mode on CPU)."""
    import kernels_pallas  # noqa: PLC0415  (kept lazy: the kernels are optional at import)

    check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    return kernels_pallas.selective_scan(
        u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
        reverse=reverse, initial_state=initial_state, return_final_state=return_final_state)


def resolve_impl(impl: str, dims: ScanDims | None = None) -> str:
    """Turns "auto" into a concrete implementation for the default backend and this shape."""
    if impl not in IMPLS:
        raise ValueError(f"selective_scan: impl={impl!r} is not one of {IMPLS}")
    if impl != "auto":
        return impl
    platform = jax.default_backend()
    if platform not in ("gpu", "cuda", "rocm", "tpu"):
        # A CPU gains little from the associative scan's parallel levels and pays for their
        # extra work: the step loop is faster there (benchmarks/README.md, "On a CPU").
        return "sequential"
    try:
        import kernels_pallas  # noqa: PLC0415
    except ImportError as err:  # pragma: no cover - the package ships with mmx_jax
        log.info("selective_scan: auto falls back to 'associative': %s", err)
        return "associative"
    reason = kernels_pallas.unsupported_reason(platform, **dims._asdict()) if dims else None
    if reason:
        log.info("selective_scan: auto falls back to 'associative': %s", reason)
        return "associative"
    return "pallas"


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   reverse=False, initial_state=None, return_final_state=False,
                   impl: Impl = "auto"):
    """Selective scan (S6): see the module docstring for shapes and semantics.

    Args:
      u, delta: (batch, length, E) input and step size.
      A: (E, N) state matrix (negative real diagonal, one row per channel).
      B, C: (batch, length, N) or (batch, length, G, N) input and output projections.
      D: optional (E,) skip connection.  z: optional (batch, length, E) gate (y *= silu(z)).
      delta_bias: optional (E,) added to delta before the softplus.
      delta_softplus: apply softplus to delta (+ bias).
      reverse: scan from the last step to the first.
      initial_state: optional (batch, E, N) state before the first step scanned.
      return_final_state: also return the (batch, E, N) state after the last step
        (float32, or float64 for float64 inputs).
      impl: "sequential", "associative", "pallas" or "auto" (pallas on GPU/TPU where the
        shape is supported, associative on other GPU/TPU shapes, sequential on CPU).

    Returns:
      y (batch, length, E) in u's dtype, or (y, final_state) when return_final_state.
    """
    dims = check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    kwargs = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                  reverse=reverse, initial_state=initial_state,
                  return_final_state=return_final_state)
    match resolve_impl(impl, dims):
        case "sequential":
            return selective_scan_sequential(u, delta, A, B, C, **kwargs)
        case "associative":
            return selective_scan_associative(u, delta, A, B, C, **kwargs)
        case "pallas":
            return selective_scan_pallas(u, delta, A, B, C, **kwargs)
